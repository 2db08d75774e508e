"""CIFAR-10 and CIFAR-100 with the CIFAR variant of ResNet-18, as in the KOALA paper's image experiments.

The data is read from the python-pickle files exactly as distributed at https://www.cs.toronto.edu/~kriz/cifar.html
(the "python version" tarballs): `cifar-10-batches-py/{data_batch_1..5,test_batch}` and
`cifar-100-python/{train,test}`, under `$KOALA_DATA_DIR/datasets/`, or in the folder `data_dir` names (that folder
itself or its parent). The files are read with a restricted unpickler (`CifarUnpickler`) that builds only what those
files contain (dicts, lists, bytes, strings, integers and NumPy arrays) and refuses every other global, so a
tampered file raises ValueError instead of running code.

Training follows the paper's setup: batches of 128 drawn without replacement (the last partial batch is dropped), a
random crop from 4-pixel zero padding and a random horizontal flip, then per-channel normalisation. The test split is
the validation set, as in the paper.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from koala.workloads.base import (
    PATH_FIELD,
    Batch,
    Mode,
    Range,
    Workload,
    WorkloadConfig,
    dataset_folders,
    model_device,
)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGE_SHAPE = (3, 32, 32)
Split = Literal["train", "test"]


@dataclasses.dataclass(frozen=True)
class CifarDataset:
    """Where one CIFAR dataset's files are and how to read and normalise them."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    # Per-channel statistics of the training images in [0, 1] (the values the paper's code uses).
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tarball: str

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files

    def source(self) -> str:
        return (
            f"They come from the {self.title} python version tarball ({self.tarball}) at {CIFAR_URL}; "
            f"extract it into $KOALA_DATA_DIR/datasets (or into the folder data_dir names)."
        )


CIFAR10 = CifarDataset(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{k}" for k in range(1, 6)),
    test_files=("test_batch",),
    label_key=b"labels",
    num_classes=10,
    mean=(125.3 / 255, 123.0 / 255, 113.9 / 255),
    std=(63.0 / 255, 62.1 / 255, 66.7 / 255),
    tarball="cifar-10-python.tar.gz",
)
CIFAR100 = CifarDataset(
    title="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key=b"fine_labels",
    num_classes=100,
    mean=(129.3 / 255, 124.1 / 255, 112.4 / 255),
    std=(68.2 / 255, 65.4 / 255, 70.4 / 255),
    tarball="cifar-100-python.tar.gz",
)


@dataclasses.dataclass(frozen=True)
class CifarConfig(WorkloadConfig):
    """Settings of the CIFAR workloads.

    Attributes:
        data_dir: the extracted dataset folder or its parent; empty means $KOALA_DATA_DIR/datasets/<dataset folder>.
        augment: random crop (4-pixel zero padding) and horizontal flip of training images.
        width: channels of the first stage (64 is ResNet-18; later stages have 2x, 4x, 8x).
        limit_train: use only the first this many training images (0: all).
        limit_val: use only the first this many test images (0: all).
    """

    data_dir: str = dataclasses.field(default="", metadata={PATH_FIELD: True})
    batch_size: Annotated[int, Range(1, 8192)] = 128
    augment: bool = True
    width: Annotated[int, Range(1, 256)] = 64
    limit_train: Annotated[int, Range(0, 1_000_000)] = 0
    limit_val: Annotated[int, Range(0, 1_000_000)] = 0

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"batch_size": 16, "width": 8, "limit_train": 64, "limit_val": 32}


# ---- model -----------------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (1x1 conv-BN where the shape changes), ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: a 3x3 stride-1 stem and no max-pool, then 4 stages of 2 basic blocks.

    At width 64 and 10 classes it has 11,173,962 parameters, like torchvision's ResNet-18 with the CIFAR stem that
    the paper uses; the initialisation is torchvision's too (Kaiming-normal fan-out convs, BN at 1 and 0).
    """

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        in_channels = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2**stage
            stages.append(
                nn.Sequential(BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1))
            )
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, 32, 32)
        x = self.stem(x)  # (B, w, 32, 32)
        x = self.stages(x)  # (B, 8w, 4, 4)
        x = torch.flatten(self.pool(x), 1)  # (B, 8w)
        logits: Tensor = self.fc(x)  # (B, num_classes)
        return logits


# ---- data ------------------------------------------------------------------------------------------------------------


# The globals a CIFAR python-pickle file refers to: NumPy's array reconstruction, under its NumPy 1 module name (the
# distributed files) and its NumPy 2 one. They map to this NumPy's own objects, so no module is imported by name.
_RECONSTRUCT: Any = np.ndarray.__reduce__(np.zeros(0, np.uint8))[0]
CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle referred to a global that `CifarUnpickler` does not admit."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what CIFAR python-pickle files contain: dicts, lists, tuples, bytes, strings,
    numbers and NumPy arrays. Any other global (a function or class a crafted file would call) raises
    `RefusedGlobal` before anything is called; persistent ids and out-of-band buffers are refused by the base class.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return CIFAR_GLOBALS[module, name]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python-pickle file as (images uint8 (N, 3072), labels int64 (N,)), read with `CifarUnpickler`.

    Raises:
        ValueError: naming the file, if it is not a pickle of that format, or if it refers to a global other than
            NumPy's array reconstruction (the refused global is named; nothing of the file's is run).
    """
    try:
        with path.open("rb") as f:
            content = CifarUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as error:
        raise ValueError(
            f"{path}: refused global {error}: a CIFAR python-pickle file holds only dicts, lists, bytes, strings, "
            f"integers and NumPy arrays, so it is not one (nothing in it was run)"
        ) from None
    except Exception as error:  # unpickling garbage can raise almost anything
        raise ValueError(f"{path}: not a CIFAR python-pickle file ({type(error).__name__}: {error})") from error
    if not isinstance(content, dict) or b"data" not in content or label_key not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{path}: expected a dict with keys b'data' and {label_key!r}, got {keys}")
    images, labels = content[b"data"], content[label_key]
    pixels = int(np.prod(IMAGE_SHAPE))
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (pixels,)):
        found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (N, {pixels}), got {found}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {label_key!r} must be a list of integers ({error})") from error
    if labels.shape != (len(images),):
        raise ValueError(f"{path}: {len(images)} images but {label_key!r} has shape {labels.shape}")
    if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
        raise ValueError(f"{path}: labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return images, labels


def load_split(paths: Sequence[Path], label_key: bytes, num_classes: int, limit: int = 0) -> tuple[Tensor, Tensor]:
    """The files of one split, concatenated in order and cut to the first `limit` images (0: all).

    Returns:
        images uint8 (N, 3, 32, 32) and labels int64 (N,), kept as uint8 to hold CIFAR in 4x less memory.
    """
    parts = [read_batch(path, label_key, num_classes) for path in paths]
    images = np.concatenate([part[0] for part in parts])  # (N, 3072), row-major CHW per image
    labels = np.concatenate([part[1] for part in parts])  # (N,)
    if limit:
        # Copies, so that the rest of the split is freed rather than kept alive by a view.
        images, labels = images[:limit].copy(), labels[:limit].copy()
    return torch.from_numpy(images.reshape(-1, *IMAGE_SHAPE)), torch.from_numpy(labels)


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Per image: a random crop of the original size from `padding` pixels of zero padding on each side, then a
    horizontal flip with probability 1/2. Vectorised over the batch, no per-image loop.

    Args:
        images: (B, C, H, W), any dtype (uint8 here, so the zero padding is black before normalisation).
        generator: the only source of randomness (on the CPU, like `images`).
    """
    size, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    top = torch.randint(0, 2 * padding + 1, (size,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (size,), generator=generator)
    flip = torch.randint(0, 2, (size,), generator=generator, dtype=torch.bool)
    # Every crop position as a view, (B, C, 2p + 1, 2p + 1, H, W); indexing copies only the chosen ones, which is
    # about 3x faster than gathering single pixels.
    windows = padded.unfold(2, height, 1).unfold(3, width, 1)
    crops = windows[torch.arange(size), :, top, left]  # (B, C, H, W)
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


# ---- workloads -------------------------------------------------------------------------------------------------------


class CifarResNet18(Workload):
    """ResNet-18 on a CIFAR dataset; subclasses choose the dataset."""

    metric = "val_accuracy"
    mode = "max"
    extra_metrics: ClassVar[dict[str, Mode]] = {"val_top5_accuracy": "max"}
    Config = CifarConfig
    dataset: ClassVar[CifarDataset]

    def __init__(self, config: WorkloadConfig) -> None:
        if not isinstance(config, CifarConfig):
            raise TypeError(f"{type(self).__name__} needs a CifarConfig, got {type(config).__name__}")
        super().__init__(config)
        self.config: CifarConfig = config
        self._splits: dict[Split, tuple[Tensor, Tensor]] = {}  # loaded on first use
        spec = self.dataset
        # (1, 3, 1, 1), broadcast over (B, 3, 32, 32).
        self._mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def __getstate__(self) -> dict[str, Any]:
        # Ship the config, not the loaded images, when the workload is pickled to another process.
        return {**self.__dict__, "_splits": {}}

    def prepare(self) -> None:
        self.split("train")
        self.split("test")

    def build_model(self) -> nn.Module:
        return ResNet18(self.dataset.num_classes, self.config.width)

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        images, labels = self.split("train")  # (N, 3, 32, 32) uint8, (N,) int64
        size = self.config.batch_size
        if len(images) < size:
            raise ValueError(f"batch_size: {size} is more than the {len(images)} training images")
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - size + 1, size):  # the last partial batch is dropped
            index = order[start : start + size]
            batch = images[index]  # (B, 3, 32, 32) uint8
            if self.config.augment:
                batch = random_crop_flip(batch, generator)
            yield self.normalise(batch), labels[index]

    def losses(self, model: nn.Module, batch: Batch) -> Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels, reduction="none")  # (B,)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        images, labels = self.split("test")
        device = model_device(model)
        # Twice the training batch, as the paper's code: evaluation keeps no activations for a backward pass.
        size = 2 * self.config.batch_size
        k = min(5, self.dataset.num_classes)
        # (loss sum, top-1 hits, top-5 hits), summed on the device so there is one sync at the end.
        totals = torch.zeros(3, device=device)
        with torch.no_grad():
            for start in range(0, len(images), size):
                # Moving uint8 and normalising on the device moves 4x fewer bytes.
                x = self.normalise(images[start : start + size].to(device, non_blocking=True))  # (B, 3, 32, 32)
                y = labels[start : start + size].to(device, non_blocking=True)  # (B,)
                logits = model(x).float()  # (B, classes); float in case the loop runs autocast
                hits = logits.topk(k, dim=1).indices == y[:, None]  # (B, k)
                totals += torch.stack(
                    [F.cross_entropy(logits, y, reduction="sum"), hits[:, 0].sum(), hits.any(dim=1).sum()]
                )
        loss, top1, top5 = (totals / max(len(images), 1)).tolist()
        return {"val_accuracy": top1, "val_top5_accuracy": top5, "val_loss": loss}

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, 32, 32) -> float32 (B, 3, 32, 32), standardised per channel."""
        mean, std = self._mean.to(images.device), self._std.to(images.device)
        return (images.float() / 255 - mean) / std

    def split(self, split: Split) -> tuple[Tensor, Tensor]:
        """The images uint8 (N, 3, 32, 32) and labels int64 (N,) of "train" or "test", read on first use.

        Raises:
            FileNotFoundError: naming the expected files and where they come from, if any is missing.
            ValueError: naming the file, if one is not in the CIFAR python-pickle format.
        """
        if split not in self._splits:
            spec, folder, train = self.dataset, self.data_folder(), split == "train"
            files = spec.train_files if train else spec.test_files
            limit = self.config.limit_train if train else self.config.limit_val
            self._splits[split] = load_split([folder / f for f in files], spec.label_key, spec.num_classes, limit)
        return self._splits[split]

    def data_folder(self) -> Path:
        """The folder holding all of the dataset's files: `data_dir` itself or `data_dir/<dataset folder>` if
        `data_dir` is set, else `$KOALA_DATA_DIR/datasets/<dataset folder>`."""
        spec = self.dataset
        expected = f"{spec.folder}/{{{','.join(spec.files)}}}"
        folders = dataset_folders(self.config.data_dir, spec.folder, self.name, expected, spec.source())
        for folder in folders:
            if all((folder / name).is_file() for name in spec.files):
                return folder
        # Report the files missing from the folder the user most likely meant.
        folder = next((f for f in folders if any((f / name).exists() for name in spec.files)), folders[-1])
        missing = [name for name in spec.files if not (folder / name).is_file()]
        where = (
            f"data_dir {self.config.data_dir!r} (the folder or its parent)"
            if self.config.data_dir
            else f"{str(folder)!r} ($KOALA_DATA_DIR/datasets/{spec.folder})"
        )
        raise FileNotFoundError(
            f"workload {self.name!r} reads {expected} from {where}; missing in {str(folder)!r}: "
            f"{', '.join(missing)}. {spec.source()}"
        )


class Cifar10ResNet18(CifarResNet18):
    name = "cifar10-resnet18"
    description = "ResNet-18 (CIFAR variant) on CIFAR-10; reads cifar-10-batches-py from data_dir"
    dataset = CIFAR10


class Cifar100ResNet18(CifarResNet18):
    name = "cifar100-resnet18"
    description = "ResNet-18 (CIFAR variant) on CIFAR-100 fine labels; reads cifar-100-python from data_dir"
    dataset = CIFAR100
