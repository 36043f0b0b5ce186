"""Regenerate ``pfc_fast/app/datasets/fashion_mnist_subset.npz``, the dataset embedded in the package.

Source: the Debian package ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``,
files under /usr/share/datasets/fashion-mnist/; Zalando's Fashion-MNIST, MIT licence, see
``pfc_fast/app/datasets/FASHION_MNIST_LICENSE``). The subset is class-balanced: the first
``--train-per-class`` training images and the first ``--test-per-class`` test images of each class,
in file order (no randomness). The output is byte-for-byte reproducible: the ``.npz`` (a zip of
``.npy`` arrays, readable by ``numpy.load``) is written with fixed entry timestamps.

    .venv/bin/python tools/make_embedded_fashion_mnist.py   # writes the file, prints its sha256

Arrays: ``train_images`` / ``test_images`` uint8 ``(N, 28, 28)``, ``train_labels`` /
``test_labels`` uint8 ``(N,)`` sorted by class, then by position in the source file.
"""
import argparse
import hashlib
import io
import os
import sys
import zipfile

import numpy as np

from pfc_fast.app.data import DEBIAN_FASHION_MNIST, EMBEDDED_PATH, read_idx


def _first_per_class(images, labels, per_class):
    """The first ``per_class`` samples of every class, grouped by class."""
    keep = []
    for c in range(10):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise SystemExit(f"class {c} has {len(members)} samples, fewer than the {per_class} asked for")
        keep.append(members[:per_class])
    keep = np.concatenate(keep)
    return images[keep], labels[keep]


def _write_npz(path, arrays):
    """``numpy.savez_compressed`` with fixed timestamps, so the bytes depend on the arrays only."""
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue(), compresslevel=9)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=DEBIAN_FASHION_MNIST, help="directory of the idx files")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--out", default=EMBEDDED_PATH)
    args = parser.parse_args(argv)

    arrays = {}
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("test", "t10k", args.test_per_class)):
        images = read_idx(os.path.join(args.source, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(args.source, f"{prefix}-labels-idx1-ubyte.gz"))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _first_per_class(images, labels, per_class)
    _write_npz(args.out, arrays)
    with open(args.out, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    print(f"wrote {args.out}: {os.path.getsize(args.out)} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
