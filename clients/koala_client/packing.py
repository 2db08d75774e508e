"""Packing a workload directory for the service: a zip archive of its files, each under the directory's name.

`pack("./my_workload")` holds `my_workload/model.py`, `my_workload/__init__.py`, ..., so a JobSpec sent with it names
`workload: my_workload.model:MyWorkload`. Left out: `.git` and other version-control folders, `__pycache__` and
`.pyc` files, tool caches, virtual environments (`.venv`, `venv`, any folder with a `pyvenv.cfg` or `conda-meta`),
and whatever `.koalaignore` at the top of the directory lists: one glob per line (`*.ckpt`, `data/`, `/notes.md`),
gitignore-style: a pattern with a slash is relative to the top, a trailing slash matches folders only, `#` starts a
comment; negation (`!`) is not supported. Links are refused (the service accepts plain files only).

The archive is deterministic (sorted entries, fixed timestamps and permissions), so the same files give the same
digest and a second upload of an unchanged directory is skipped. Packing stops as soon as the archive passes the
server's size limit, naming the largest files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_BYTES = 20 << 20  # the service's default limit, for a server that does not say its own
DEFAULT_MAX_FILES = 1000
DEFAULT_MAX_UNPACKED_BYTES = 200 << 20
IGNORE_FILE = ".koalaignore"
SKIPPED_FOLDERS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        ".venv",
        "venv",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".ipynb_checkpoints",
        ".tox",
        ".nox",
    }
)
VENV_MARKERS = ("pyvenv.cfg", "conda-meta")
SKIPPED_SUFFIXES = (".pyc", ".pyo")
TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # the earliest a zip archive can say: every pack of the same files is identical


class PackError(ValueError):
    """The directory cannot be packed for the server (too large, a link, nothing in it, ...)."""


@dataclass(frozen=True)
class Pack:
    """A packed workload: the zip archive's bytes, its digest and the files it holds as (path, size)."""

    data: bytes
    digest: str  # "sha256:<hex>"
    files: list[tuple[str, int]]
    source: Path

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class _Pattern:
    glob: str
    folders_only: bool
    anchored: bool  # matched against the path from the top, not the name

    def matches(self, relative: str, is_folder: bool) -> bool:
        if self.folders_only and not is_folder:
            return False
        target = relative if self.anchored else relative.rsplit("/", 1)[-1]
        return fnmatch.fnmatchcase(target, self.glob)


def ignore_patterns(text: str) -> list[_Pattern]:
    """The patterns of a `.koalaignore` file."""
    patterns = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("!"):
            raise PackError(f"{IGNORE_FILE} line {number}: negation (!) is not supported")
        folders_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line
        patterns.append(_Pattern(line.lstrip("/"), folders_only, anchored))
    return patterns


def _is_venv(path: Path) -> bool:
    return any((path / marker).exists() for marker in VENV_MARKERS)


def mib(size: float) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def collect(root: Path) -> list[tuple[str, Path]]:
    """The files of `root` to pack, as (path relative to root, file), sorted; raises PackError for links and
    special files that are not left out."""
    ignore_file = root / IGNORE_FILE
    patterns = ignore_patterns(ignore_file.read_text()) if ignore_file.is_file() else []

    def ignored(relative: str, is_folder: bool) -> bool:
        return any(pattern.matches(relative, is_folder) for pattern in patterns)

    found: list[tuple[str, Path]] = []
    for folder, subfolders, names in os.walk(root):
        here = Path(folder)
        prefix = here.relative_to(root).as_posix()
        prefix = "" if prefix == "." else f"{prefix}/"
        kept = []
        for name in sorted(subfolders):
            path, relative = here / name, f"{prefix}{name}"
            if name in SKIPPED_FOLDERS or ignored(relative, True):
                continue
            if path.is_symlink():
                raise PackError(
                    f"{relative} is a link: the service accepts plain files only (list it in {IGNORE_FILE}, or copy "
                    "what it points to)"
                )
            if _is_venv(path):
                continue
            kept.append(name)
        subfolders[:] = kept  # os.walk descends into these only
        for name in sorted(names):
            path, relative = here / name, f"{prefix}{name}"
            if name.endswith(SKIPPED_SUFFIXES) or ignored(relative, False):
                continue
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise PackError(
                    f"{relative} is a link: the service accepts plain files only (list it in {IGNORE_FILE}, or copy "
                    "what it points to)"
                )
            if not stat.S_ISREG(mode):
                raise PackError(f"{relative} is not a regular file (list it in {IGNORE_FILE})")
            found.append((relative, path))
    return sorted(found)


def pack(
    source: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
) -> Pack:
    """Pack a workload directory (or take a `.zip` file as it is) within the server's limits; PackError otherwise,
    before anything is sent."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".zip":
        return _zip_file(path, max_bytes)
    if not path.is_dir():
        raise PackError(f"{path} is not a directory (nor a .zip archive)")
    root = path.resolve()
    if not root.name:
        raise PackError(f"{path} has no name to pack it under")
    files = collect(root)
    if not files:
        raise PackError(f"{path} holds no files to upload (after leaving out caches, environments and {IGNORE_FILE})")
    if len(files) > max_files:
        raise PackError(
            f"{path} holds {len(files)} files; the server accepts at most {max_files} (list what the workload does not "
            f"need in {IGNORE_FILE})"
        )
    sizes = [(relative, file.stat().st_size) for relative, file in files]
    unpacked = sum(size for _, size in sizes)
    if unpacked > max_unpacked_bytes:
        raise _too_large(path, f"its files add up to {mib(unpacked)}", max_unpacked_bytes, sizes)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for relative, file in files:
            info = zipfile.ZipInfo(f"{root.name}/{relative}", TIMESTAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix: the permissions below are read as such
            executable = file.stat().st_mode & stat.S_IXUSR
            info.external_attr = (stat.S_IFREG | (0o755 if executable else 0o644)) << 16
            archive.writestr(info, file.read_bytes(), compresslevel=6)
            if buffer.tell() > max_bytes:
                raise _too_large(path, "it packs to more than that", max_bytes, sizes)
    data = buffer.getvalue()
    if len(data) > max_bytes:
        raise _too_large(path, f"it packs to {mib(len(data))}", max_bytes, sizes)
    files_in_pack = [(f"{root.name}/{relative}", size) for relative, size in sizes]
    return Pack(data, f"sha256:{hashlib.sha256(data).hexdigest()}", files_in_pack, path)


def _too_large(path: Path, what: str, limit: int, sizes: list[tuple[str, int]]) -> PackError:
    largest = sorted(sizes, key=lambda item: -item[1])[:3]
    shown = ", ".join(f"{relative} ({mib(size)})" for relative, size in largest)
    return PackError(
        f"{path} is too large to upload: the server accepts {mib(limit)}, and {what}. Largest files: {shown}; list "
        f"what the workload does not need (data, checkpoints) in {IGNORE_FILE}"
    )


def _zip_file(path: Path, max_bytes: int) -> Pack:
    size = path.stat().st_size
    if size > max_bytes:
        raise PackError(f"{path} is {mib(size)}; the server accepts at most {mib(max_bytes)}")
    data = path.read_bytes()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            files = [(info.filename, info.file_size) for info in archive.infolist() if not info.is_dir()]
    except zipfile.BadZipFile as error:
        raise PackError(f"{path} is not a zip archive: {error}") from None
    return Pack(data, f"sha256:{hashlib.sha256(data).hexdigest()}", files, path)
