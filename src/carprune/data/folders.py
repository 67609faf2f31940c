"""Image folders read at the model's input size: `root/<class>/*`, presplit `train/ val/ test/`
of that layout, or unlabelled images (labels come from the model, `--labels model`).

Files stay on disk and are decoded by DataLoader workers, through torchvision's standard
transforms: for scoring and testing, resize the shorter side, centre crop, normalise with the
model's mean and std; for fine-tuning, random resized crop and horizontal flip. The
preprocessing is a plain dict, written to model.json, so a pruned model reloads with it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from ..errors import CarpruneError
from ._base import IMAGENET_STATS, Data

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
DEFAULT_SIZE = 224
DEFAULT_CROP = 0.875  # 224 of 256: the ImageNet evaluation convention


def preprocess_for(model: nn.Module | None, image_size: int | None = None) -> dict:
    """The evaluation preprocessing of `model`: what its model.json recorded, else timm's
    pretrained config (input size, crop, mean, std, interpolation), else ImageNet's at the
    model's recorded input size or 224 px; `image_size` replaces the crop side (and scales the
    resize with it)."""
    described = getattr(model, "carprune_spec", {})
    spec = described.get("preprocess")
    if spec and image_size in (None, spec["size"]):
        return dict(spec)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    shape = described.get("input_shape") or cfg.get("input_size") or (3, DEFAULT_SIZE)
    size = image_size or shape[-1]
    if not isinstance(size, int) or size < 8:
        raise CarpruneError(f"--image-size must be a whole number of pixels, at least 8; got "
                            f"{size}")
    crop = cfg.get("crop_pct", DEFAULT_CROP)
    mean, std = cfg.get("mean", IMAGENET_STATS[0]), cfg.get("std", IMAGENET_STATS[1])
    return {"size": size, "resize": int(round(size / crop)), "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "interpolation": cfg.get("interpolation", "bilinear")}


def eval_transform(pre: dict) -> v2.Compose:
    mode = InterpolationMode(pre["interpolation"])
    return v2.Compose([v2.ToImage(), v2.Resize(pre["resize"], interpolation=mode, antialias=True),
                       v2.CenterCrop(pre["size"]), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(pre["mean"], pre["std"])])


def train_transform(pre: dict) -> v2.Compose:
    mode = InterpolationMode(pre["interpolation"])
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(pre["size"], interpolation=mode,
                                                          antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(pre["mean"], pre["std"])])


def read_rgb(path: Path) -> Image.Image:
    """An image file as 8-bit RGB: palette, grey, CMYK and alpha converted, 16-bit grey scaled
    (not clipped) to 8 bits; a file PIL cannot decode is one sentence naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
                img = Image.fromarray(np.rint(wide.clip(0, top) * 255 / top).astype(np.uint8))
            with warnings.catch_warnings():  # palette images with transparency warn
                warnings.simplefilter("ignore")
                return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise CarpruneError(f"image {path} cannot be read ({exc}); remove or replace it") \
            from None


class ImageFiles(Dataset):
    """Labelled image files, decoded on access through `transform`."""

    def __init__(self, paths: list[Path], labels: list[int], transform, eval_view=None):
        self.paths, self.labels, self.transform = paths, labels, transform
        self._eval = eval_view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_rgb(self.paths[i])), self.labels[i]

    def eval_view(self) -> ImageFiles:
        """The same files through the evaluation transform (to label a training split)."""
        return self if self._eval is None else ImageFiles(self.paths, self.labels, self._eval)


def _class_names(root: Path, presplit: bool) -> tuple[list[str], bool]:
    base = root / "train" if presplit else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    unlabelled = not classes and any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir())
    if not classes and not unlabelled:
        raise CarpruneError(f"{root} has no class folders; lay the images out as "
                            "root/<class>/*.png")
    return (["."] if unlabelled else classes), unlabelled


def _scan(base: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Every image file under base/<class>/ (base itself for "."), each header checked."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = base / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if folder.is_dir() else []
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise CarpruneError(f"{base} holds no .png/.jpg images under its class folders; "
                            "add images or point at the right folder")
    for path in paths:
        try:
            with Image.open(path):
                pass
        except (OSError, UnidentifiedImageError) as exc:
            raise CarpruneError(f"image {path} cannot be read ({exc}); remove or replace it") \
                from None
    return paths, labels


def image_folder(root: str | os.PathLike, preprocess: dict | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                 workers: int | None = None) -> Data:
    """A user's images at the model's input size (`preprocess_for`), split per a fixed seed
    unless root holds train/, val/ and test/ folders."""
    root = Path(root)
    if not root.is_dir():
        raise CarpruneError(f"image folder {root} does not exist; give a folder laid out as "
                            "root/<class>/*.png")
    pre = preprocess or preprocess_for(None)
    presplit = all((root / s).is_dir() for s in ("train", "val", "test"))
    classes, unlabelled = _class_names(root, presplit)
    test_view, train_view = eval_transform(pre), train_transform(pre)
    if presplit:
        found = {s: _scan(root / s, classes) for s in ("train", "val", "test")}
    else:
        paths, labels = _scan(root, classes)
        order = np.random.default_rng(seed).permutation(len(paths))
        n_val = max(1, int(len(paths) * val_fraction))
        n_test = max(1, int(len(paths) * test_fraction))
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test],
                 "train": order[n_val + n_test:]}
        found = {s: ([paths[i] for i in idx], [labels[i] for i in idx])
                 for s, idx in parts.items()}
    splits = {s: ImageFiles(*found[s], test_view) for s in ("val", "test")}
    splits["train"] = ImageFiles(*found["train"], train_view, eval_view=test_view)
    return Data(name=f"folder:{root}", classes=["unlabelled"] if unlabelled else classes,
                mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                meta={"root": str(root), "unlabelled": unlabelled}, preprocess=pre,
                workers=default_workers() if workers is None else workers, augment=False,
                **splits)


def default_workers() -> int:
    """DataLoader processes decoding files: all cores but one, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))
