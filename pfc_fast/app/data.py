"""Image-classification data for ``pfc-fast train``: loaders that never download, class-balanced
subsets, normalisation and seeded augmentation.

Every loader returns an :class:`ImageData` with uint8 images ``(N, C, H, W)`` held in memory
(CIFAR-10's 50,000 training images take 150 MB) and int64 labels. Datasets (``DATASETS``):

- ``embedded`` (default): a class-balanced Fashion-MNIST subset shipped inside the package
  (500 training and 100 test images per class, ``pfc_fast/app/datasets/fashion_mnist_subset.npz``, made by
  ``tools/make_embedded_fashion_mnist.py`` from the Debian package ``dataset-fashion-mnist``;
  Zalando's MIT licence in ``pfc_fast/app/datasets/FASHION_MNIST_LICENSE``).
- ``fashion-mnist`` (all 60,000 / 10,000): the Debian package's directory
  (/usr/share/datasets/fashion-mnist) or ``--data-dir`` in torchvision's layout
  (``DIR/FashionMNIST/raw/``, idx files, gzipped or not).
- ``mnist``, ``cifar10``, ``cifar100``, ``svhn``, ``stl10``: ``--data-dir`` in torchvision's
  layout (what ``torchvision.datasets.X(DIR, download=True)`` leaves), read directly (torchvision's
  classes would also check the archives' md5 sums).
- ``digits``: scikit-learn's ``load_digits`` (1,797 8x8 images, inside the scikit-learn wheel),
  split 80/20 stratified with a fixed seed.

Missing files raise one ``FileNotFoundError`` that lists where they were looked for and how to get
them.
"""
from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._inputs import check_choice, positive_int
from .config import AUGMENTATIONS, DATASETS


HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_PATH = os.path.join(HERE, "datasets", "fashion_mnist_subset.npz")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _torchvision(*calls: str) -> str:
    """How to fetch a dataset in torchvision's layout on a machine with network access."""
    code = "; ".join(f"torchvision.datasets.{call}" for call in calls)
    return f"on a machine with network access run `python -c \"import torchvision; {code}\"`, copy DIR here and " \
           "pass --data-dir DIR"


_HOW_TO_GET = {
    "embedded": "reinstall pfc_fast (the file ships with the package) or regenerate it with "
                "tools/make_embedded_fashion_mnist.py",
    "fashion-mnist": "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or " + _torchvision(
        "FashionMNIST('DIR', download=True)", "FashionMNIST('DIR', train=False, download=True)"),
    "mnist": _torchvision("MNIST('DIR', download=True)", "MNIST('DIR', train=False, download=True)"),
    "cifar10": _torchvision("CIFAR10('DIR', download=True)"),
    "cifar100": _torchvision("CIFAR100('DIR', download=True)"),
    "svhn": _torchvision("SVHN('DIR', split='train', download=True)", "SVHN('DIR', split='test', download=True)"),
    "stl10": _torchvision("STL10('DIR', download=True)"),
}


@dataclass(frozen=True)
class ImageData:
    """A labelled image dataset in memory: uint8 images ``(N, C, H, W)``, int64 labels ``(N,)``."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    @property
    def channels(self) -> int:
        """Channels of the images."""
        return self.train_images.shape[1]

    def normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and standard deviation of the training images (in [0, 1] units)."""
        pixels = self.train_images.transpose(0, 1).reshape(self.channels, -1).double() / 255.0
        return pixels.mean(1).float(), pixels.std(1).float()


def load_dataset(name: str, data_dir: str | None = None) -> ImageData:
    """The dataset ``name`` (one of ``DATASETS``), read from ``data_dir`` where it lives on disk."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} does not exist or is not a directory")
    if name == "embedded":
        return _embedded()
    if name == "digits":
        return _digits()
    if name == "fashion-mnist":
        if data_dir is None:
            return _idx_dataset(name, [DEBIAN_FASHION_MNIST])
        return _idx_dataset(name, [os.path.join(data_dir, "FashionMNIST", "raw"), data_dir])
    if data_dir is None:
        raise FileNotFoundError(f"dataset {name!r} is read from a directory: {_HOW_TO_GET[name]}")
    if name == "mnist":
        return _idx_dataset(name, [os.path.join(data_dir, "MNIST", "raw"), data_dir])
    if name in ("cifar10", "cifar100"):
        return _cifar(name, data_dir)
    if name == "svhn":
        return _svhn(data_dir)
    return _stl10(data_dir)


def _missing(name: str, looked_for: Sequence[str]) -> FileNotFoundError:
    listing = "\n  ".join(looked_for)
    return FileNotFoundError(f"dataset {name!r} not found; looked for:\n  {listing}\nTo get it: {_HOW_TO_GET[name]}")


def _images(array: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, C, H, W)`` numpy images as a contiguous ``(N, C, H, W)`` tensor."""
    images = torch.from_numpy(np.require(array, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]))
    return images.unsqueeze(1) if images.dim() == 3 else images


def _labels(array: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.int64).reshape(-1).copy())


#: A split of a dataset as read from disk: uint8 images (numpy), their labels (any integer sequence).
_Split = tuple[np.ndarray, Any]


def _make(name: str, train: _Split, test: _Split, num_classes: int) -> ImageData:
    return ImageData(name, _images(train[0]), _labels(train[1]), _images(test[0]), _labels(test[1]), num_classes)


def _embedded() -> ImageData:
    if not os.path.isfile(EMBEDDED_PATH):
        raise _missing("embedded", [EMBEDDED_PATH])
    with np.load(EMBEDDED_PATH) as arrays:
        return _make("embedded", (arrays["train_images"], arrays["train_labels"]),
                     (arrays["test_images"], arrays["test_labels"]), 10)


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, shipped inside its wheel (no download): ``pixels (1797, 64)`` float64
    with values 0..16 (8x8 images, row by row) and ``labels (1797,)`` int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - scikit-learn is a dependency
        raise SystemExit("the digits data needs scikit-learn (pip install scikit-learn)") from error
    digits = load_digits()
    return digits.data, digits.target


def _digits() -> ImageData:
    from sklearn.model_selection import train_test_split

    pixels, labels = digits_pixels()
    images = np.rint(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=0.2, stratify=labels,
                                                        random_state=0)
    return _make("digits", (train_x, train_y), (test_x, test_y), 10)


def read_idx(path: str) -> np.ndarray:
    """An idx-ubyte file (MNIST's format; gzipped when the name ends in ``.gz``) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {array.size} values")
    return array.reshape(shape)


def _find_idx(roots: Sequence[str], stem: str) -> str | None:
    for root in roots:
        for candidate in (stem, stem + ".gz"):
            path = os.path.join(root, candidate)
            if os.path.isfile(path):
                return path
    return None


def _idx_dataset(name: str, roots: Sequence[str]) -> ImageData:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [path for path in (_find_idx(roots, stem) for stem in stems) if path is not None]
    if len(paths) < len(stems):
        raise _missing(name, [os.path.join(root, stem + "[.gz]") for root in roots for stem in stems])
    train_x, train_y, test_x, test_y = (read_idx(path) for path in paths)
    return _make(name, (train_x, train_y), (test_x, test_y), 10)


def _cifar(name: str, data_dir: str) -> ImageData:
    if name == "cifar10":
        folder, key, classes = "cifar-10-batches-py", "labels", 10
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    else:
        folder, key, classes = "cifar-100-python", "fine_labels", 100
        train_files, test_files = ["train"], ["test"]
    paths = [os.path.join(data_dir, folder, file) for file in train_files + test_files]
    if not all(os.path.isfile(path) for path in paths):
        raise _missing(name, paths)

    def read(files: Sequence[str]) -> _Split:
        images: list[np.ndarray] = []
        labels: list[int] = []
        for file in files:
            with open(os.path.join(data_dir, folder, file), "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[key])
        return np.concatenate(images), labels

    return _make(name, read(train_files), read(test_files), classes)


def _svhn(data_dir: str) -> ImageData:
    from scipy.io import loadmat

    paths = [os.path.join(data_dir, f"{split}_32x32.mat") for split in ("train", "test")]
    if not all(os.path.isfile(path) for path in paths):
        raise _missing("svhn", paths)
    splits: list[_Split] = []
    for path in paths:
        mat = loadmat(path)
        labels = mat["y"].astype(np.int64).reshape(-1)
        labels[labels == 10] = 0  # SVHN labels the digit 0 as 10
        splits.append((np.transpose(mat["X"], (3, 2, 0, 1)), labels))  # (H, W, C, N) -> (N, C, H, W)
    return _make("svhn", splits[0], splits[1], 10)


def _stl10(data_dir: str) -> ImageData:
    folder = os.path.join(data_dir, "stl10_binary")
    names = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    paths = [os.path.join(folder, file) for file in names]
    if not all(os.path.isfile(path) for path in paths):
        raise _missing("stl10", paths)
    splits: list[_Split] = []
    for images_path, labels_path in (paths[:2], paths[2:]):
        images = np.fromfile(images_path, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # column-major
        splits.append((images, np.fromfile(labels_path, dtype=np.uint8).astype(np.int64) - 1))  # labels 1..10
    return _make("stl10", splits[0], splits[1], 10)


def balanced_indices(labels: torch.Tensor, per_class: int, num_classes: int, seed: int,
                     name: str = "probe_per_class") -> torch.Tensor:
    """``per_class`` indices of every class, drawn without replacement with a seeded generator.

    Returns the indices sorted; raises ``ValueError`` naming ``name`` (the option that set
    ``per_class``) when a class has fewer samples.
    """
    positive_int(per_class, name)
    counts = torch.bincount(labels, minlength=num_classes)
    smallest = int(counts.argmin())
    if int(counts[smallest]) < per_class:
        raise ValueError(f"{name} = {per_class} is larger than the training data allows: class {smallest} "
                         f"has {int(counts[smallest])} samples")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    chosen = [order[labels[order] == c][:per_class] for c in range(num_classes)]
    return torch.cat(chosen).sort().values


def to_float(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images to normalised float32: ``(x / 255 - mean) / std`` per channel."""
    mean, std = mean.to(images.device), std.to(images.device)
    return (images.float() / 255.0 - mean[:, None, None]) / std[:, None, None]


def augment(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Seeded augmentation of a uint8 batch ``(B, C, H, W)``.

    ``"crop"``: zero-pad by ``H // 8`` pixels and crop back at a random offset; ``"crop-flip"``:
    also mirror half of the images left-right (as in He et al. 2016 on CIFAR). The randomness comes
    from ``generator`` only, so a run replays exactly given the same generator state.
    """
    check_choice(kind, "augment", AUGMENTATIONS)
    if kind == "none":
        return images
    batch, channels, height, width = images.shape
    pad = max(1, height // 8)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
    samples = torch.arange(batch, device=images.device)[:, None, None, None]
    planes = torch.arange(channels, device=images.device)[None, :, None, None]
    out = padded[samples, planes, rows, cols]
    if kind == "crop-flip":
        flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out
