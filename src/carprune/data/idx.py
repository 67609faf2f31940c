"""IDX files (LeCun's MNIST format): Fashion-MNIST (Debian's dataset-fashion-mnist), its tinted
control, MNIST. Held in memory as normalised float tensors: the scoring engines reuse the same
images many times, and tens of thousands of 28x28 images fit easily."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import CarpruneError
from ._base import Data, balanced_split, data_root, normalise

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
MNIST_STATS = ((0.1307,), (0.3081,))
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or raw."""
    path = Path(path)
    if not path.is_file():
        raise CarpruneError(f"data file {path} does not exist; point --data-dir at the folder "
                            "holding it (or install the Debian package dataset-fashion-mnist)")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise CarpruneError(f"{path} is a damaged gzip file ({exc}); replace it with an "
                                "intact copy") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CarpruneError(f"{path} is not an IDX file (bad magic number); replace it with an "
                            "IDX image or label file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise CarpruneError(f"{path} has a truncated IDX header; replace it with an intact copy")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise CarpruneError(f"{path} holds {len(raw) - header} data bytes but its header promises "
                            f"{expected}; the file is truncated or damaged, replace it")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    raise CarpruneError(f"{root / (stem + '.gz')} does not exist; point --data-dir (or "
                        "CARPRUNE_DATA) at the folder with the IDX files, or install the Debian "
                        "package dataset-fashion-mnist")


def load_idx_pair(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem = IDX_FILES[split]
    images = read_idx(_find_idx(root, images_stem))
    labels = read_idx(_find_idx(root, labels_stem))
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise CarpruneError(f"the {split} IDX files in {root} are not unsigned-byte images and "
                            "labels; replace them with the data set's original files")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CarpruneError(f"the {split} IDX files in {root} do not fit together (images "
                            f"{images.shape}, labels {labels.shape}); replace them with a "
                            "matching pair")
    return images, labels


def _idx_dataset(name: str, root: Path, classes: list[str], stats, val_per_class: int,
                 seed: int) -> Data:
    train_x, train_y = load_idx_pair(root, "train")
    test_x, test_y = load_idx_pair(root, "test")
    mean, std = stats
    for split, y in (("train", train_y), ("test", test_y)):
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise CarpruneError(f"the {split} labels in {root} fall outside 0..{len(classes) - 1}; "
                                "the label file does not belong to this data set")
    for split, x in (("train", train_x), ("test", test_x)):
        if x.shape[1:] != (28, 28):
            raise CarpruneError(f"the {split} images in {root} are {x.shape[1]}x{x.shape[2]}, "
                                f"not the 28x28 of {name}; replace them with the original files")
    rest, held = balanced_split(train_y, val_per_class, seed)

    def make(x, y):
        return TensorDataset(normalise(x, mean, std), torch.as_tensor(y.astype(np.int64)))

    return Data(name=name, train=make(train_x[rest], train_y[rest]),
                val=make(train_x[held], train_y[held]), test=make(test_x, test_y),
                classes=list(classes), mean=mean, std=std,
                meta={"root": str(root), "val_seed": seed, "val_per_class": val_per_class})


def fashion_mnist(data_dir: str | os.PathLike | None = None, val_per_class: int = 500,
                  seed: int = 0) -> Data:
    """Fashion-MNIST: train 55 000 / val 5 000 (500 a class, fixed seed) / official test 10 000."""
    root = data_root(data_dir, DEBIAN_FASHION_MNIST)
    return _idx_dataset("fashion-mnist", root, FASHION_MNIST_CLASSES, FASHION_MNIST_STATS,
                        val_per_class, seed)


def tint(images: np.ndarray, seed: int) -> np.ndarray:
    """Grey images (N, H, W) -> RGB (N, 3, H, W), each multiplied by its own random colour drawn
    independently of its label (RGB components uniform in [0.15, 1]), so colour carries no
    class information by construction."""
    colours = np.random.default_rng(seed).uniform(0.15, 1.0, size=(len(images), 3, 1, 1))
    return np.rint(images[:, None].astype(np.float64) * colours).astype(np.uint8)


def fashion_mnist_colour(data_dir: str | os.PathLike | None = None, val_per_class: int = 500,
                         seed: int = 0) -> Data:
    """Fashion-MNIST with every image tinted by a random colour independent of its class: a
    controlled case for colour filters (the splits are those of `fashion_mnist`)."""
    root = data_root(data_dir, DEBIAN_FASHION_MNIST)
    train_x, train_y = load_idx_pair(root, "train")
    test_x, test_y = load_idx_pair(root, "test")
    train_c, test_c = tint(train_x, seed + 1), tint(test_x, seed + 2)
    x = train_c.reshape(len(train_c), 3, -1) / 255.0
    mean = tuple(float(m) for m in x.mean((0, 2)))
    std = tuple(float(v) for v in x.std((0, 2)))
    rest, held = balanced_split(train_y, val_per_class, seed)

    def make(images, labels):
        return TensorDataset(normalise(images, mean, std),
                             torch.as_tensor(labels.astype(np.int64)))

    return Data(name="fashion-mnist-colour", train=make(train_c[rest], train_y[rest]),
                val=make(train_c[held], train_y[held]), test=make(test_c, test_y),
                classes=list(FASHION_MNIST_CLASSES), mean=mean, std=std,
                meta={"root": str(root), "val_seed": seed, "val_per_class": val_per_class,
                      "tint_seed": seed})


def mnist(root: str | os.PathLike, val_per_class: int = 500, seed: int = 0) -> Data:
    """MNIST from user-supplied IDX files (same layout and splits as Fashion-MNIST)."""
    return _idx_dataset("mnist", Path(root), [str(d) for d in range(10)], MNIST_STATS,
                        val_per_class, seed)
