"""Datasets and splits: IDX files (Fashion-MNIST, MNIST) and image folders.

Everything is held in memory as normalised float tensors: the scoring engines reuse the same
images many times, and the data sets we target (tens of thousands of small images) fit easily.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .errors import CarpruneError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
MNIST_STATS = ((0.1307,), (0.3081,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
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


@dataclass
class Data:
    """A classification data set split three ways: train (fit), val (scoring), test (report)."""

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.tensors[0].shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def loader(self, split: str, batch_size: int = 500, shuffle: bool = False,
               seed: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(getattr(self, split), batch_size=batch_size, shuffle=shuffle,
                          generator=generator)

    def describe(self) -> dict:
        return {"name": self.name, "classes": self.classes, "mean": list(self.mean),
                "std": list(self.std), "input_shape": list(self.input_shape)}


def normalise(images: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) -> normalised float32 (N, C, H, W)."""
    x = torch.tensor(np.asarray(images)).float().div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def balanced_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out) with `per_class` images of each class held out, reproducibly."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) <= per_class:
            raise CarpruneError(f"class {c} has only {len(members)} images, too few to hold out "
                                f"{per_class} for scoring; use more data or a smaller val split")
        held.append(rng.choice(members, size=per_class, replace=False))
    held_idx = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(labels)), held_idx)
    return rest, held_idx


def data_root(data_dir: str | os.PathLike | None, default: Path) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("CARPRUNE_DATA"):
        return Path(os.environ["CARPRUNE_DATA"])
    return default


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


def _read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(img).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError) as exc:
        raise CarpruneError(f"image {path} cannot be read ({exc}); remove or replace it") from None


def image_folder(root: str | os.PathLike, size: int = 32, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, seed: int = 0,
                 stats=IMAGENET_STATS) -> Data:
    """A user's RGB images laid out as root/<class>/*.png|jpg, split per class by a fixed seed.

    Where root holds train/, val/ and test/ folders of that layout, those are the splits.
    """
    root = Path(root)
    if not root.is_dir():
        raise CarpruneError(f"image folder {root} does not exist; give a folder laid out as "
                            "root/<class>/*.png")
    presplit = all((root / s).is_dir() for s in ("train", "val", "test"))
    class_dirs = sorted(p for p in (root / "train" if presplit else root).iterdir() if p.is_dir())
    classes = [p.name for p in class_dirs]
    unlabelled = not classes and any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir())
    if unlabelled:  # images without class folders: labels come later (--labels model)
        classes = ["."]
    if not classes:
        raise CarpruneError(f"{root} has no class folders; lay the images out as "
                            "root/<class>/*.png")

    def scan(base: Path) -> tuple[list[Path], list[int]]:
        paths, labels = [], []
        for label, name in enumerate(classes):
            folder = base / name  # "." (unlabelled) is the folder itself
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
                if folder.is_dir() else []
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise CarpruneError(f"{base} holds no .png/.jpg images under its class folders; "
                                "add images or point at the right folder")
        return paths, labels

    def make(paths, labels):
        x = np.stack([_read_image(p, size) for p in paths])
        return TensorDataset(normalise(x, *stats), torch.tensor(labels, dtype=torch.int64))

    if presplit:
        splits = {s: make(*scan(root / s)) for s in ("train", "val", "test")}
    else:
        paths, labels = scan(root)
        order = np.random.default_rng(seed).permutation(len(paths))
        n_val = max(1, int(len(paths) * val_fraction))
        n_test = max(1, int(len(paths) * test_fraction))
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test],
                 "train": order[n_val + n_test:]}
        splits = {s: make([paths[i] for i in idx], [labels[i] for i in idx])
                  for s, idx in parts.items()}
    return Data(name=f"folder:{root}", classes=["unlabelled"] if unlabelled else classes,
                mean=stats[0], std=stats[1], meta={"root": str(root), "unlabelled": unlabelled},
                **splits)


def check_fits(model: nn.Module, data) -> None:
    """Refuse data whose image shape or class count does not match the model."""
    shape = getattr(model, "carprune_spec", {}).get("input_shape")
    if shape and list(data.input_shape) != list(shape):
        raise CarpruneError(f"the data's images are {list(data.input_shape)} but the model "
                            f"takes {shape}; use the data set the model was trained on")
    with torch.inference_mode():
        out = model.eval()(data.val.tensors[0][:2])
    if out.shape[-1] != data.num_classes and not data.meta.get("unlabelled"):
        raise CarpruneError(f"the model predicts {out.shape[-1]} classes but the data has "
                            f"{data.num_classes}; use the data set the model was trained on")


def load_data(name: str, data_dir: str | os.PathLike | None = None) -> Data:
    """The CLI's door: `fashion-mnist`, `mnist` (needs --data-dir) or a path to an image folder."""
    if name == "fashion-mnist":
        return fashion_mnist(data_dir)
    if name == "fashion-mnist-colour":
        return fashion_mnist_colour(data_dir)
    if name == "mnist":
        if data_dir is None and not os.environ.get("CARPRUNE_DATA"):
            raise CarpruneError("mnist needs its IDX files; pass --data-dir FOLDER")
        return mnist(data_root(data_dir, Path(".")))
    if Path(name).is_dir():
        return image_folder(name)
    raise CarpruneError(f"unknown data set {name!r}; use fashion-mnist, fashion-mnist-colour, "
                        "mnist (with --data-dir) or the path of an image folder")


# -- photographs that ship inside packages ------------------------------------------------
# Real RGB photographs for scoring a pretrained RGB network without downloading anything:
# matplotlib (a dependency) ships Grace Hopper's portrait; scikit-image, when installed
# (`make rgb`), ships more in skimage/data. Found with importlib.util.find_spec, so scikit-image
# is never imported.

PACKAGE_PHOTOS = (
    ("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("astronaut", "skimage", "data/astronaut.png"),
    ("chelsea", "skimage", "data/chelsea.png"),
    ("coffee", "skimage", "data/coffee.png"),
    ("rocket", "skimage", "data/rocket.jpg"),
    ("motorcycle", "skimage", "data/motorcycle_left.png"),
)


def _package_file(package: str, relative: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / relative).is_file():
            return Path(folder) / relative
    return None


def package_photos() -> dict[str, np.ndarray]:
    """The photographs of PACKAGE_PHOTOS that the installed packages ship, by name, as uint8
    (H, W, 3) RGB arrays, in PACKAGE_PHOTOS' order."""
    from PIL import Image

    photos = {}
    for name, package, relative in PACKAGE_PHOTOS:
        path = _package_file(package, relative)
        if path is not None:
            with Image.open(path) as img:
                photos[name] = np.asarray(img.convert("RGB"))
    if not photos:
        raise CarpruneError("no package ships a photograph here (matplotlib's sample data is "
                            "missing); reinstall matplotlib or pip install scikit-image")
    return photos


def photo_windows(photos: dict[str, np.ndarray], per_photo: int, seed: int = 0,
                  size: int = 48, min_side: int = 48,
                  max_fraction: float = 0.7) -> tuple[torch.Tensor, list[dict]]:
    """Square windows of each photo, reproducibly drawn, resized to size x size by area
    interpolation (as MTCNN resizes its windows), each followed by its mirror image.

    A window's side is uniform in [min_side, max_fraction * the photo's shorter side], its place
    uniform in the photo (photos smaller than min_side are skipped). Returns float32 pixels in
    [0, 255], (2 * per_photo * photos, 3, size, size), unrounded like MTCNN's, and for each
    image where it came from."""
    rng = np.random.default_rng(seed)
    images, origin = [], []
    for name, photo in photos.items():
        height, width = photo.shape[:2]
        if min(height, width) < min_side:
            continue
        pixels = torch.tensor(photo).permute(2, 0, 1)[None].float()
        top = max(min_side, int(max_fraction * min(height, width)))
        for _ in range(per_photo):
            side = int(rng.integers(min_side, top + 1))
            y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            window = nn.functional.interpolate(pixels[:, :, y:y + side, x:x + side],
                                               size=(size, size), mode="area")
            images += [window, window.flip(3)]
            origin += [{"photo": name, "y": y, "x": x, "side": side, "mirrored": m}
                       for m in (False, True)]
    return torch.cat(images), origin
