"""Dataset loaders on small generated files in torchvision's layouts, checked against torchvision's
own dataset classes reading the same files; missing data; the embedded subset; augmentation."""
import gzip
import os
import pickle

import numpy as np
import pytest
import scipy.io
import torch
import torchvision

from pfc_fast.app import data


def _random_images(rng, n, shape):
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    opener = gzip.open if compress else open
    with opener(path + (".gz" if compress else ""), "wb") as handle:
        handle.write(header + array.tobytes())


def _make_idx_set(root, rng, compress):
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", 30), ("t10k", 10)):
        images, labels = _random_images(rng, n, (28, 28)), rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte"), images, compress)
        _write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte"), labels, compress)
        arrays[prefix] = images, labels
    return arrays


def _assert_same(ours, images, labels):
    """``ours`` (uint8 NCHW tensor, int64 labels) equals the reference (numpy NCHW, labels)."""
    assert ours[0].dtype == torch.uint8 and ours[1].dtype == torch.int64
    np.testing.assert_array_equal(ours[0].numpy(), np.asarray(images))
    np.testing.assert_array_equal(ours[1].numpy(), np.asarray(labels))


@pytest.mark.parametrize("name,folder,cls", [("mnist", "MNIST", torchvision.datasets.MNIST),
                                             ("fashion-mnist", "FashionMNIST", torchvision.datasets.FashionMNIST)])
def test_idx_datasets_match_torchvision(tmp_path, name, folder, cls):
    _make_idx_set(str(tmp_path / folder / "raw"), np.random.default_rng(1), compress=False)
    loaded = data.load_dataset(name, str(tmp_path))
    for train, images, labels in ((True, loaded.train_images, loaded.train_labels),
                                  (False, loaded.test_images, loaded.test_labels)):
        reference = cls(str(tmp_path), train=train, download=False)  # checks existence only, no md5
        _assert_same((images, labels), reference.data.numpy()[:, None], reference.targets.numpy())
    assert loaded.num_classes == 10 and loaded.channels == 1


def test_idx_gzipped_in_a_flat_directory(tmp_path):
    """The Debian package's layout: gzipped idx files directly in the directory."""
    arrays = _make_idx_set(str(tmp_path), np.random.default_rng(2), compress=True)
    loaded = data.load_dataset("fashion-mnist", str(tmp_path))
    _assert_same((loaded.train_images, loaded.train_labels), arrays["train"][0][:, None], arrays["train"][1])
    _assert_same((loaded.test_images, loaded.test_labels), arrays["t10k"][0][:, None], arrays["t10k"][1])


def _no_md5(monkeypatch, module, cls):
    """torchvision checks the md5 sums of the real archives; these files are generated."""
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    if hasattr(module, "check_integrity"):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_matches_torchvision(tmp_path, monkeypatch, name):
    rng = np.random.default_rng(3)
    if name == "cifar10":
        folder, train, test, key, meta, cls = ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                                               ["test_batch"], "labels", ("batches.meta", "label_names"),
                                               torchvision.datasets.CIFAR10)
    else:
        folder, train, test, key, meta, cls = ("cifar-100-python", ["train"], ["test"], "fine_labels",
                                               ("meta", "fine_label_names"), torchvision.datasets.CIFAR100)
    classes = 10 if name == "cifar10" else 100
    os.makedirs(tmp_path / folder)
    for file in train + test:
        entry = {"data": _random_images(rng, 4, (3 * 32 * 32,)), key: rng.integers(0, classes, 4).tolist()}
        with open(tmp_path / folder / file, "wb") as handle:
            pickle.dump(entry, handle)
    with open(tmp_path / folder / meta[0], "wb") as handle:
        pickle.dump({meta[1]: [str(c) for c in range(classes)]}, handle)
    _no_md5(monkeypatch, torchvision.datasets.cifar, cls)
    loaded = data.load_dataset(name, str(tmp_path))
    assert loaded.num_classes == classes and loaded.train_images.shape == (4 * len(train), 3, 32, 32)
    for flag, images, labels in ((True, loaded.train_images, loaded.train_labels),
                                 (False, loaded.test_images, loaded.test_labels)):
        reference = cls(str(tmp_path), train=flag, download=False)
        _assert_same((images, labels), reference.data.transpose(0, 3, 1, 2), reference.targets)


def test_svhn_matches_torchvision(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    for split, n in (("train", 7), ("test", 5)):
        labels = rng.integers(1, 11, size=(n, 1))  # SVHN: 1..10, 10 is the digit 0
        labels[0] = 10
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": _random_images(rng, 32, (32, 3, n)), "y": labels})
    _no_md5(monkeypatch, torchvision.datasets.svhn, torchvision.datasets.SVHN)
    loaded = data.load_dataset("svhn", str(tmp_path))
    for split, images, labels in (("train", loaded.train_images, loaded.train_labels),
                                  ("test", loaded.test_images, loaded.test_labels)):
        reference = torchvision.datasets.SVHN(str(tmp_path), split=split, download=False)
        _assert_same((images, labels), reference.data, reference.labels)
    assert int(loaded.train_labels[0]) == 0 and int(loaded.train_labels.max()) <= 9


def test_stl10_matches_torchvision(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    os.makedirs(tmp_path / "stl10_binary")
    for split, n in (("train", 3), ("test", 2)):
        _random_images(rng, n, (3, 96, 96)).tofile(tmp_path / "stl10_binary" / f"{split}_X.bin")
        rng.integers(1, 11, size=n, dtype=np.uint8).tofile(tmp_path / "stl10_binary" / f"{split}_y.bin")
    _no_md5(monkeypatch, torchvision.datasets.stl10, torchvision.datasets.STL10)
    loaded = data.load_dataset("stl10", str(tmp_path))
    for split, images, labels in (("train", loaded.train_images, loaded.train_labels),
                                  ("test", loaded.test_images, loaded.test_labels)):
        reference = torchvision.datasets.STL10(str(tmp_path), split=split, download=False)
        _assert_same((images, labels), reference.data, reference.labels)


def test_digits_is_scikit_learns():
    """Train and test together hold exactly scikit-learn's 1,797 images (0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    loaded = data.load_dataset("digits")
    reference = load_digits()
    ours = torch.cat([loaded.train_images, loaded.test_images]).reshape(-1, 64).double().numpy()
    ours = np.concatenate([np.rint(ours * 16 / 255), torch.cat([loaded.train_labels, loaded.test_labels])
                           .numpy()[:, None]], axis=1)
    expected = np.concatenate([reference.data, reference.target[:, None]], axis=1)
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(expected, axis=0))
    assert len(ours) == len(expected) and len(loaded.test_labels) == 360


def test_embedded_subset_is_class_balanced():
    loaded = data.load_dataset("embedded")
    assert loaded.train_images.shape == (5000, 1, 28, 28) and loaded.test_images.shape == (1000, 1, 28, 28)
    assert torch.bincount(loaded.train_labels).tolist() == [500] * 10
    assert torch.bincount(loaded.test_labels).tolist() == [100] * 10
    assert os.path.getsize(data.EMBEDDED_PATH) < 4 << 20
    with open(os.path.join(os.path.dirname(data.EMBEDDED_PATH), "FASHION_MNIST_LICENSE")) as handle:
        assert "MIT" in handle.read()


@pytest.mark.parametrize("name,expected", [
    ("mnist", os.path.join("MNIST", "raw", "train-images-idx3-ubyte")),
    ("cifar10", os.path.join("cifar-10-batches-py", "data_batch_1")),
    ("cifar100", os.path.join("cifar-100-python", "train")),
    ("svhn", "train_32x32.mat"),
    ("stl10", os.path.join("stl10_binary", "train_X.bin")),
])
def test_missing_files_say_where_and_how(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset(name, str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / expected) in message and "torchvision.datasets." in message and "To get it" in message


def test_bad_dataset_arguments(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_dataset("imagenet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_dataset("cifar10", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        data.load_dataset("cifar10")


def test_balanced_indices():
    labels = torch.tensor([0, 1, 2] * 5 + [2, 2])
    chosen = data.balanced_indices(labels, 4, 3, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [4, 4, 4]
    assert chosen.tolist() == sorted(set(chosen.tolist()))
    assert torch.equal(chosen, data.balanced_indices(labels, 4, 3, seed=0))
    assert not torch.equal(chosen, data.balanced_indices(labels, 4, 3, seed=1))
    with pytest.raises(ValueError, match="probe_per_class = 6 .* class 0 has 5"):
        data.balanced_indices(labels, 6, 3, seed=0)
    with pytest.raises(ValueError, match="train_per_class must be >= 1, got 0"):
        data.balanced_indices(labels, 0, 3, seed=0, name="train_per_class")
    with pytest.raises(TypeError, match="probe_per_class must be an integer"):
        data.balanced_indices(labels, 2.0, 3, seed=0)


def test_augment_is_seeded_and_shifts_within_the_padding():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(2, 3, 8, 8) + 1
    first = data.augment(images, "crop-flip", torch.Generator().manual_seed(7))
    again = data.augment(images, "crop-flip", torch.Generator().manual_seed(7))
    assert torch.equal(first, again) and first.shape == images.shape
    assert torch.equal(data.augment(images, "none", torch.Generator()), images)
    crops = data.augment(images.repeat(50, 1, 1, 1), "crop", torch.Generator().manual_seed(8))
    for crop, image in zip(crops, images.repeat(50, 1, 1, 1)):  # each crop is a shift by at most 1 pixel
        padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
        assert any(torch.equal(crop, padded[:, dy:dy + 8, dx:dx + 8]) for dy in range(3) for dx in range(3))
