"""The pack format of uploaded workloads: a zip archive of the client's workload directory, every entry under the
directory's name (`my_workload/model.py`). `inspect_pack` reads a pack without unpacking or importing it and refuses
what the service does not store: more than `max_files` entries or `max_unpacked_bytes`, links or other special files,
absolute paths, `..`, names that are not portable, a file whose bytes do not match its checksum."""

from __future__ import annotations

import logging
import re
import stat
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

REQUIREMENTS = "requirements.txt"  # at the top of a pack (or of its directory): what it needs installed
MAX_PATH = 1024  # characters of a path in a pack
MAX_PART = 255  # characters of one path component
MAX_REQUIREMENTS = 200  # requirement lines
CHUNK = 1 << 16  # bytes read at a time


def mib(size: float) -> str:
    return f"{size / (1 << 20):.1f} MiB"


# ---- packs ---------------------------------------------------------------------------------------------------------


class PackError(ValueError):
    """A pack this server does not accept (422), or cannot use."""


@dataclass(frozen=True)
class PackInfo:
    """What a checked pack holds: its files as (path, size), their total size and its requirement lines."""

    files: list[tuple[str, int]]
    unpacked_size: int
    requirements: list[str]


def top_level(paths: list[str]) -> set[str]:
    """The importable names at the top of a pack: its directories and its `.py` files (without the suffix)."""
    names = set()
    for path in paths:
        first, _, rest = path.partition("/")
        names.add(first if rest else first.removesuffix(".py") if first.endswith(".py") else "")
    names.discard("")
    return names


def module_in(module: str, paths: list[str]) -> bool:
    """Whether `module` ("package.module") is a file or a package (a directory with files) in a pack."""
    base = module.replace(".", "/")
    return f"{base}.py" in paths or any(path.startswith(f"{base}/") for path in paths)


def _bad_name(name: str) -> str | None:
    """Why `name` cannot be a path in a pack, or None."""
    if not name:
        return "is empty"
    if len(name) > MAX_PATH:
        return f"is longer than {MAX_PATH} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "is an absolute path (paths in a pack are relative to it)"
    if "\\" in name:
        return "contains a backslash (paths in a pack use /)"
    parts = name.removesuffix("/").split("/")
    if ".." in parts:
        return "leaves the pack (`..`)"
    if any(part in ("", ".") for part in parts):
        return "is not a plain relative path (empty or `.` component)"
    if any(len(part) > MAX_PART for part in parts):
        return f"has a component longer than {MAX_PART} characters"
    return None


def _shown(name: str) -> str:
    text = repr(name)
    return text if len(text) <= 100 else f"{text[:97]}..."


def inspect_pack(source: IO[bytes], *, max_files: int, max_unpacked_bytes: int) -> PackInfo:
    """Check a pack (a seekable binary file) and say what it holds; PackError naming the first problem.

    Accepted: a zip archive (stored or deflated, not encrypted) of at most `max_files` entries that unpack to at most
    `max_unpacked_bytes`, holding regular files and directories only, at relative paths inside the pack, each file's
    bytes matching its size and CRC (read here, bounded by the declared sizes)."""
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise PackError(f"the upload is not a zip archive ({error})") from None
    with archive:
        entries = archive.infolist()
        if len(entries) > max_files:
            raise PackError(f"the pack has {len(entries)} entries; this server accepts at most {max_files}")
        files: dict[str, zipfile.ZipInfo] = {}
        listed: set[str] = set()  # directory entries
        directories: set[str] = set()  # those and every file's parents
        total = 0
        for info in entries:
            name = info.filename
            problem = _bad_name(name)
            if problem is not None:
                raise PackError(f"{_shown(name)} {problem}")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise PackError(f"{_shown(name)} is a symbolic link; a pack holds plain files only")
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise PackError(f"{_shown(name)} is not a plain file or directory")
            if info.flag_bits & 0x1:
                raise PackError(f"{_shown(name)} is encrypted")
            path = name.removesuffix("/")
            if path in files or path in listed:
                raise PackError(f"{_shown(path)} appears twice in the pack")
            parents = path.split("/")[:-1]
            directories.update("/".join(parents[: i + 1]) for i in range(len(parents)))
            if info.is_dir():
                listed.add(path)
                directories.add(path)
                continue
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise PackError(f"{_shown(name)} is compressed with method {info.compress_type}; use deflate")
            files[path] = info
            total += info.file_size
            if total > max_unpacked_bytes:
                raise PackError(f"the pack unpacks to more than {mib(max_unpacked_bytes)}, the most this server takes")
        clash = sorted(set(files) & directories)
        if clash:
            raise PackError(f"{_shown(clash[0])} is both a file and a directory in the pack")
        for path, info in files.items():
            _read_checked(archive, info, path)
        requirements = _requirements(archive, files)
    return PackInfo(sorted((path, info.file_size) for path, info in files.items()), total, requirements)


def _read_checked(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> None:
    """Read a file of the pack to its end (zipfile checks the CRC there), never more than its declared size."""
    seen = 0
    try:
        with archive.open(info) as member:
            while seen <= info.file_size and (chunk := member.read(CHUNK)):
                seen += len(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, zlib.error) as error:
        raise PackError(f"{_shown(path)} cannot be read from the pack ({error})") from None
    if seen != info.file_size:
        raise PackError(f"{_shown(path)} does not unpack to the size the pack declares")


def _requirements(archive: zipfile.ZipFile, files: Mapping[str, zipfile.ZipInfo]) -> list[str]:
    """The requirement lines of the pack's requirements.txt (at its top, or at the top of its one directory)."""
    found = [path for path in files if path.count("/") <= 1 and path.rsplit("/", 1)[-1] == REQUIREMENTS]
    if len(found) > 1:
        raise PackError(f"the pack has several {REQUIREMENTS} files ({', '.join(sorted(found))}); keep one")
    if not found:
        return []
    try:
        text = archive.read(files[found[0]]).decode("utf-8")
    except UnicodeDecodeError:
        raise PackError(f"{found[0]} is not UTF-8 text") from None
    lines = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    if len(lines) > MAX_REQUIREMENTS:
        raise PackError(f"{found[0]} lists {len(lines)} requirements; at most {MAX_REQUIREMENTS}")
    return lines
