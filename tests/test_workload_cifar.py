"""CIFAR workloads on small files in the real python-pickle format, written by the tests."""

from __future__ import annotations

import builtins
import os
import pickle
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import koala.workloads
from koala import train
from koala.workloads.cifar import CIFAR10, CIFAR100, CifarConfig, CifarDataset, CifarResNet18, read_batch

PER_FILE = 20  # CIFAR-10 images per data_batch file
N_TEST = 30
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def make_images(first: int, count: int, seed: int) -> np.ndarray:
    """uint8 (count, 3072) random pixels, with pixel (channel 0, row 0, column 0) = the image's global index."""
    images = np.random.default_rng(seed).integers(0, 256, (count, 3072), dtype=np.uint8)
    images[:, 0] = np.arange(first, first + count) % 256
    return images


def label_of(index: Tensor | np.ndarray, num_classes: int) -> Any:
    return (index * 7 + 3) % num_classes


def write_pickle(path: Path, content: dict[bytes, Any]) -> None:
    with path.open("wb") as f:
        pickle.dump(content, f)


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for k in range(5):
        index = np.arange(k * PER_FILE, (k + 1) * PER_FILE)
        content = {b"data": make_images(index[0], PER_FILE, k), b"labels": label_of(index, 10).tolist()}
        write_pickle(folder / f"data_batch_{k + 1}", {b"batch_label": b"training batch", **content})
    test = np.arange(N_TEST)
    write_pickle(folder / "test_batch", {b"data": make_images(0, N_TEST, 99), b"labels": label_of(test, 10).tolist()})
    return folder


def write_cifar100(root: Path, n_train: int = 50) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count, seed in (("train", n_train, 0), ("test", N_TEST, 99)):
        fine = label_of(np.arange(count), 100)
        content = {
            b"data": make_images(0, count, seed),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
        }
        write_pickle(folder / name, content)
    return folder


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    write_cifar10(tmp_path)
    return tmp_path


def tiny(name: str, data_dir: Path, **overrides: Any) -> CifarResNet18:
    workload = koala.workloads.get(name, **{**CifarConfig.tiny(), "data_dir": str(data_dir), **overrides})
    assert isinstance(workload, CifarResNet18)
    return workload


def unnormalise(images: Tensor, dataset: CifarDataset) -> Tensor:
    """float (B, 3, 32, 32) -> the uint8 pixels it came from, (B, 3, 32, 32)."""
    mean, std = torch.tensor(dataset.mean).view(1, 3, 1, 1), torch.tensor(dataset.std).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).round().to(torch.uint8)


def epoch(workload: CifarResNet18, seed: int) -> list[tuple[Tensor, ...]]:
    return list(workload.train_batches(0, torch.Generator().manual_seed(seed)))


# ---- data ----------------------------------------------------------------------------------------------------------


def test_cifar10_pixels_and_labels_round_trip(cifar10_dir: Path) -> None:
    workload = tiny("cifar10-resnet18", cifar10_dir, augment=False, limit_train=0)
    expected = torch.from_numpy(
        np.concatenate([make_images(k * PER_FILE, PER_FILE, k) for k in range(5)]).reshape(-1, 3, 32, 32)
    )
    batches = epoch(workload, 0)
    assert len(batches) == 5 * PER_FILE // 16  # the last partial batch is dropped
    seen = []
    for images, labels in batches:
        assert images.shape == (16, 3, 32, 32)
        assert images.dtype == torch.float32
        assert labels.shape == (16,)
        assert labels.dtype == torch.int64
        pixels = unnormalise(images, CIFAR10)
        index = pixels[:, 0, 0, 0].long()  # the global index written into each image
        torch.testing.assert_close(pixels, expected[index], rtol=0, atol=0)
        torch.testing.assert_close(labels, label_of(index, 10), rtol=0, atol=0)
        seen += index.tolist()
    assert len(set(seen)) == len(seen) == 96


def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    workload = tiny("cifar100-resnet18", tmp_path, augment=False)
    images, labels = next(iter(epoch(workload, 0)))
    index = unnormalise(images, CIFAR100)[:, 0, 0, 0].long()
    torch.testing.assert_close(labels, label_of(index, 100), rtol=0, atol=0)
    assert workload.build_model()(images).shape == (16, 100)
    assert set(workload.evaluate(workload.build_model().eval())) == {"val_accuracy", "val_top5_accuracy", "val_loss"}


def test_limits_cut_the_splits(cifar10_dir: Path) -> None:
    workload = tiny("cifar10-resnet18", cifar10_dir, limit_train=48, limit_val=7)
    assert len(workload.split("train")[0]) == 48
    assert len(workload.split("test")[0]) == 7
    assert sorted(i for _, labels in epoch(workload, 0) for i in labels.tolist()) == sorted(
        label_of(np.arange(48), 10).tolist()
    )


def test_shuffle_is_deterministic_per_generator(cifar10_dir: Path) -> None:
    workload = tiny("cifar10-resnet18", cifar10_dir)
    a, b, c = epoch(workload, 0), epoch(workload, 0), epoch(workload, 1)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c, strict=True))


def test_augmentation_is_a_crop_and_flip_of_each_image(cifar10_dir: Path) -> None:
    plain = tiny("cifar10-resnet18", cifar10_dir, augment=False)
    augmented = tiny("cifar10-resnet18", cifar10_dir)
    # The shuffle is drawn before the augmentation, so the same seed gives the same images in the same order.
    (original, labels), (images, same_labels) = epoch(plain, 3)[0], epoch(augmented, 3)[0]
    assert torch.equal(labels, same_labels)
    assert images.shape == original.shape
    source = F.pad(unnormalise(original, CIFAR10), (4, 4, 4, 4))  # (B, 3, 40, 40), zero padding
    result = unnormalise(images, CIFAR10)
    flips, shifts = 0, 0
    for i in range(len(result)):
        crops = {(top, left): source[i, :, top : top + 32, left : left + 32] for top in range(9) for left in range(9)}
        matches = [
            (top, left, flip)
            for (top, left), crop in crops.items()
            for flip in (False, True)
            if torch.equal(result[i], crop.flip(-1) if flip else crop)
        ]
        assert len(matches) == 1, f"image {i} is not one crop/flip of its original"
        top, left, flip = matches[0]
        flips += flip
        shifts += (top, left) != (4, 4)
    assert 0 < flips < len(result)
    assert shifts > 0
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(epoch(augmented, 3), epoch(augmented, 3), strict=True))
    assert not torch.equal(images, epoch(augmented, 4)[0][0])


# ---- data directory ------------------------------------------------------------------------------------------------


def test_data_dir_may_be_the_folder_or_its_parent(cifar10_dir: Path) -> None:
    by_parent = tiny("cifar10-resnet18", cifar10_dir).split("test")
    by_folder = tiny("cifar10-resnet18", cifar10_dir / "cifar-10-batches-py").split("test")
    assert torch.equal(by_parent[0], by_folder[0])
    assert torch.equal(by_parent[1], by_folder[1])


def test_data_dir_falls_back_to_datasets_under_koala_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path / "datasets")
    monkeypatch.setenv("KOALA_DATA_DIR", str(tmp_path))
    workload = koala.workloads.get("cifar10-resnet18", **CifarConfig.tiny())
    assert isinstance(workload, CifarResNet18)
    assert workload.data_folder() == tmp_path / "datasets" / "cifar-10-batches-py"
    assert len(workload.split("test")[0]) == N_TEST


@pytest.mark.parametrize("layout", ["parent", "datasets"])
def test_koala_data_dir_is_searched_in_datasets_dataset_folder_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """Neither $KOALA_DATA_DIR/cifar-10-batches-py (the old layout) nor files directly in datasets/ is read."""
    folder = write_cifar10(tmp_path)
    if layout == "datasets":
        folder.rename(tmp_path / "datasets")
    monkeypatch.setenv("KOALA_DATA_DIR", str(tmp_path))
    expected = tmp_path / "datasets" / "cifar-10-batches-py"
    with pytest.raises(FileNotFoundError, match=r"\$KOALA_DATA_DIR/datasets/cifar-10-batches-py") as error:
        koala.workloads.get("cifar10-resnet18", **CifarConfig.tiny()).prepare()
    assert f"missing in {str(expected)!r}: data_batch_1, " in str(error.value)


def test_no_data_dir_names_files_and_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOALA_DATA_DIR", raising=False)
    workload = koala.workloads.get("cifar100-resnet18")
    with pytest.raises(FileNotFoundError, match="KOALA_DATA_DIR") as error:
        workload.evaluate(nn.Linear(1, 1))
    assert "$KOALA_DATA_DIR/datasets/cifar-100-python" in str(error.value)
    assert CIFAR_URL in str(error.value)


@pytest.mark.parametrize("name", ["cifar10-resnet18", "cifar100-resnet18"])
def test_missing_directory_names_files_and_source(tmp_path: Path, name: str) -> None:
    workload = tiny(name, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as error:
        epoch(workload, 0)
    message = str(error.value)
    dataset = workload.dataset
    assert dataset.folder in message
    assert CIFAR_URL in message
    assert dataset.tarball in message
    assert all(file in message for file in dataset.files)


def test_missing_file_is_named(cifar10_dir: Path) -> None:
    (cifar10_dir / "cifar-10-batches-py" / "data_batch_4").unlink()
    for data_dir in (cifar10_dir, cifar10_dir / "cifar-10-batches-py"):
        with pytest.raises(FileNotFoundError, match=r"missing in .*cifar-10-batches-py'?: data_batch_4\. "):
            tiny("cifar10-resnet18", data_dir).evaluate(nn.Linear(1, 1))


def test_prepare_reads_both_splits_before_training(cifar10_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's `prepare()` reads the training and the test split; a missing test file fails there, before any
    training epoch (not after the first one, at evaluation)."""
    workload = tiny("cifar10-resnet18", cifar10_dir)
    workload.prepare()
    assert set(workload._splits) == {"train", "test"}
    (cifar10_dir / "cifar-10-batches-py" / "test_batch").unlink()
    fresh = tiny("cifar10-resnet18", cifar10_dir)
    monkeypatch.setattr(fresh, "train_batches", lambda *_: pytest.fail("an epoch started before the data was read"))
    with pytest.raises(FileNotFoundError, match=r"test_batch"):
        train.run(fresh, "sgd", {"lr": 0.1}, epochs=1)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"not a pickle", "not a CIFAR python-pickle file"),
        ({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, "shape"),
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "uint8"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "4 images"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, r"\[0, 10\)"),
        ({b"data": np.zeros((4, 3072), np.uint8)}, "keys"),
    ],
)
def test_corrupt_file_is_named(cifar10_dir: Path, content: Any, problem: str) -> None:
    path = cifar10_dir / "cifar-10-batches-py" / "test_batch"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_pickle(path, content)
    with pytest.raises(ValueError, match=problem) as error:
        tiny("cifar10-resnet18", cifar10_dir).evaluate(nn.Linear(1, 1))
    assert str(path) in str(error.value)


def python2_pickle(images: np.ndarray, labels: list[int], label_key: bytes) -> bytes:
    """The bytes Python 2's cPickle writes (protocol 2) for a CIFAR batch, as in the distributed files: str keys as
    SHORT_BINSTRING, the array through numpy.core.multiarray._reconstruct, its pixels as one BINSTRING."""

    def string(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value if len(value) < 256 else b"T" + struct.pack("<i", len(value)) + value

    def integer(value: int) -> bytes:
        return b"K" + bytes([value]) if value < 256 else b"M" + struct.pack("<H", value)

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"  # empty array
        b"(K\x01" + integer(len(images)) + integer(3072) + b"\x86"  # state: version 1, shape,
        b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xff"
        b"J\xff\xff\xff\xffK\x00tb"  # dtype uint8,
        b"\x89" + string(images.tobytes()) + b"tb"  # Fortran order False, the pixels; BUILD
    )
    label_list = b"](" + b"".join(integer(label) for label in labels) + b"e"
    batch = string(b"batch_label") + string(b"training batch 1 of 5")
    return b"\x80\x02}q\x01(" + batch + string(b"data") + array + string(label_key) + label_list + b"u."


def test_python2_format_of_the_distributed_files(tmp_path: Path) -> None:
    images = make_images(0, 5, seed=3)
    labels = [9, 0, 3, 255, 7]
    path = tmp_path / "data_batch_1"
    path.write_bytes(python2_pickle(images, labels, b"fine_labels"))
    read_images, read_labels = read_batch(path, b"fine_labels", num_classes=256)
    assert read_images.dtype == np.uint8
    assert np.array_equal(read_images, images)
    assert read_labels.tolist() == labels


@pytest.mark.parametrize(
    ("protocol", "refused"),
    [
        # Before protocol 3, Python 3 pickles bytes through _codecs.encode; in protocol 5 NumPy pickles arrays through
        # its _frombuffer. Neither is in a distributed CIFAR file, so both are refused like any other global.
        (0, r"_codecs\.encode"),
        (1, r"_codecs\.encode"),
        (2, r"_codecs\.encode"),
        (3, None),
        (4, None),
        (5, r"numpy\._?core\.numeric\._frombuffer"),
    ],
)
def test_files_pickled_by_python3_numpy(tmp_path: Path, protocol: int, refused: str | None) -> None:
    path = tmp_path / "test_batch"
    images = make_images(0, 4, seed=1)
    path.write_bytes(pickle.dumps({b"data": images, b"labels": [1, 2, 3, 4]}, protocol=protocol))
    if refused is not None:
        with pytest.raises(ValueError, match=f"refused global {refused}: "):
            read_batch(path, b"labels", 10)
        return
    read_images, labels = read_batch(path, b"labels", 10)
    assert np.array_equal(read_images, images)
    assert labels.tolist() == [1, 2, 3, 4]


class Exploit:
    """Unpickles as `function(*args)`: what a crafted file would run if it were unpickled unrestricted."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.function, self.args


def exploits(marker: Path) -> dict[str, Any]:
    """Pickle payloads that would each create `marker`."""
    return {
        "os.system": Exploit(os.system, f"touch {marker}"),
        "eval": Exploit(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "exec": Exploit(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": Exploit(subprocess.Popen, ["touch", str(marker)]),
        "Path.touch": Exploit(Path.touch, marker),
        "numpy.save": Exploit(np.save, str(marker), np.zeros(1)),
        "nested in data": {b"data": Exploit(os.system, f"touch {marker}"), b"labels": [0]},
        "a dict key": {Exploit(os.system, f"touch {marker}"): 1},
    }


EXPLOITS = list(exploits(Path("marker")))
REFUSED = {
    "os.system": f"{os.system.__module__}.system",
    "eval": "builtins.eval",
    "exec": "builtins.exec",
    "subprocess.Popen": "subprocess.Popen",
    "Path.touch": "pathlib.Path.touch",
    "numpy.save": "numpy.save",
    "nested in data": f"{os.system.__module__}.system",
    "a dict key": f"{os.system.__module__}.system",
}


def write_exploit(cifar10_dir: Path, kind: str, protocol: int = pickle.DEFAULT_PROTOCOL) -> tuple[Path, Path]:
    """Replace data_batch_1 with exploit `kind`; returns the file and the marker the exploit would create."""
    marker = cifar10_dir / "pwned"
    path = cifar10_dir / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps(exploits(marker)[kind], protocol=protocol))
    return path, marker


@pytest.mark.parametrize("kind", EXPLOITS)
def test_crafted_pickle_is_refused_by_prepare_without_running_it(cifar10_dir: Path, kind: str) -> None:
    path, marker = write_exploit(cifar10_dir, kind)
    workload = koala.workloads.get("cifar10-resnet18", data_dir=str(cifar10_dir), **CifarConfig.tiny())
    with pytest.raises(ValueError, match=r"refused global ") as error:
        workload.prepare()
    assert str(error.value).startswith(f"{path}: refused global {REFUSED[kind]}: ")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "eval", "subprocess.Popen"])
def test_crafted_pickle_fails_a_training_run_without_running_it(
    cifar10_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    _, marker = write_exploit(cifar10_dir, kind)
    (cifar10_dir / "datasets").mkdir()
    (cifar10_dir / "cifar-10-batches-py").rename(cifar10_dir / "datasets" / "cifar-10-batches-py")
    monkeypatch.setenv("KOALA_DATA_DIR", str(cifar10_dir))  # the service's layout: no data_dir in the config
    with pytest.raises(ValueError, match=f"refused global {REFUSED[kind]}"):
        train.run("cifar10-resnet18", "sgd", {"lr": 0.1}, epochs=1, workload_config=CifarConfig.tiny())
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_crafted_pickle_is_refused_in_every_protocol(cifar10_dir: Path, protocol: int) -> None:
    path, marker = write_exploit(cifar10_dir, "os.system", protocol)
    with pytest.raises(ValueError, match=f"^{path}: refused global {REFUSED['os.system']}"):
        read_batch(path, b"labels", 10)
    assert not marker.exists()


# ---- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"colour": True}, "colour"),
        ({"width": "8"}, "width"),
        ({"augment": 1}, "augment"),
        ({"data_dir": 3}, "data_dir"),
        ({"width": 0}, "width"),
        ({"limit_train": -1}, "limit_train"),
        ({"limit_val": -1}, "limit_val"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_config_names_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        koala.workloads.get("cifar10-resnet18", **overrides)


def test_batch_larger_than_training_set(cifar10_dir: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        epoch(tiny("cifar10-resnet18", cifar10_dir, batch_size=128), 0)


# ---- model, loss, evaluation ---------------------------------------------------------------------------------------


def test_resnet18_size() -> None:
    model = koala.workloads.get("cifar10-resnet18").build_model()
    parameters = list(model.parameters())
    assert len(parameters) == 62
    assert 11_100_000 < sum(p.numel() for p in parameters) < 11_200_000


class Oracle(nn.Module):
    """Reads each test image's index from its first pixel and predicts its label with probability `confidence`."""

    def __init__(self, confidence: float, shift: int = 0) -> None:
        super().__init__()
        self.confidence, self.shift = confidence, shift
        self.dummy = nn.Parameter(torch.zeros(()))  # for model_device

    def forward(self, images: Tensor) -> Tensor:
        index = unnormalise(images, CIFAR10)[:, 0, 0, 0].long()
        target = (label_of(index, 10) + self.shift) % 10
        rest = (1 - self.confidence) / 9
        probabilities = torch.full((len(images), 10), rest).scatter(1, target[:, None], self.confidence)
        return probabilities.log()


def test_evaluate_computes_accuracy_and_loss(cifar10_dir: Path) -> None:
    workload = tiny("cifar10-resnet18", cifar10_dir, limit_val=0, batch_size=8)  # 30 images: batches 16, 14
    metrics = workload.evaluate(Oracle(0.5))
    assert metrics["val_accuracy"] == metrics["val_top5_accuracy"] == 1.0
    assert metrics["val_loss"] == pytest.approx(-np.log(0.5), rel=1e-5)
    assert workload.evaluate(Oracle(0.5, shift=1))["val_accuracy"] == 0.0


def test_evaluate_and_sgd_steps_on_tiny_resnet(cifar10_dir: Path) -> None:
    torch.manual_seed(0)
    workload = tiny("cifar10-resnet18", cifar10_dir)
    model = workload.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = epoch(workload, 0)[0]
    first = workload.losses(model, batch)
    assert first.shape == (16,)
    assert torch.isfinite(first).all()
    for _ in range(4):  # one batch, fitted: the loss must fall
        optimizer.zero_grad()
        workload.losses(model, batch).mean().backward()
        optimizer.step()
    assert workload.losses(model, batch).mean() < first.mean()
    model.eval()
    metrics = workload.evaluate(model)
    assert set(metrics) == {"val_accuracy", "val_top5_accuracy", "val_loss"}
    assert all(isinstance(value, float) for value in metrics.values())
    assert 0 <= metrics["val_accuracy"] <= metrics["val_top5_accuracy"] <= 1
    assert 0 < metrics["val_loss"] < 20


def test_pickling_drops_loaded_data(cifar10_dir: Path) -> None:
    workload = tiny("cifar10-resnet18", cifar10_dir)
    workload.split("test")
    copy = pickle.loads(pickle.dumps(workload))
    assert copy.config == workload.config
    assert copy._splits == {}
    assert torch.equal(copy.split("test")[1], workload.split("test")[1])
