"""Data: three splits (train fits, val scores, test reports) from IDX files, image folders at
the model's size, the user's own factory, or photographs that ship inside packages.
`load_data` is the command line's door."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..devices import device_of
from ..errors import CarpruneError
from ._base import IMAGENET_STATS as IMAGENET_STATS
from ._base import Data as Data
from ._base import balanced_split as balanced_split
from ._base import check_fits as check_fits
from ._base import data_root as data_root
from ._base import first_images as first_images
from ._base import normalise as normalise
from .folders import default_workers
from .folders import image_folder as image_folder
from .folders import preprocess_for as preprocess_for
from .idx import fashion_mnist as fashion_mnist
from .idx import fashion_mnist_colour as fashion_mnist_colour
from .idx import mnist as mnist
from .idx import read_idx as read_idx
from .idx import tint as tint
from .photos import package_photos as package_photos
from .photos import photo_windows as photo_windows

IDX_SETS = ("fashion-mnist", "fashion-mnist-colour", "mnist")


def load_data(name: str, data_dir: str | os.PathLike | None = None,
              model: nn.Module | None = None, image_size: int | None = None,
              workers: int | None = None) -> Data:
    """`fashion-mnist`, `fashion-mnist-colour`, `mnist` (needs --data-dir), an image folder
    (read at `model`'s input size, or `image_size`), or `package.module:function`."""
    if name in IDX_SETS and image_size is not None:
        raise CarpruneError(f"--image-size applies to image folders and data factories; {name} "
                            "images are 28x28, drop --image-size")
    if name == "fashion-mnist":
        return fashion_mnist(data_dir)
    if name == "fashion-mnist-colour":
        return fashion_mnist_colour(data_dir)
    if name == "mnist":
        if data_dir is None and not os.environ.get("CARPRUNE_DATA"):
            raise CarpruneError("mnist needs its IDX files; pass --data-dir FOLDER")
        return mnist(data_root(data_dir, Path(".")))
    if Path(name).is_dir():
        return image_folder(name, preprocess_for(model, image_size), workers=workers)
    if ":" in name:
        return from_factory(name, model, image_size, workers)
    raise CarpruneError(f"unknown data set {name!r}; use fashion-mnist, fashion-mnist-colour, "
                        "mnist (with --data-dir), the path of an image folder, or a factory "
                        "package.module:function")


def from_factory(name: str, model: nn.Module | None, image_size: int | None,
                 workers: int | None) -> Data:
    """The user's own pipeline: `package.module:function` returns (train, val, test) Datasets
    or DataLoaders (or a dict of them, or a carprune Data); it is called with image_size=N
    when --image-size is given. Class names come from the val set's `classes`, else the model's
    outputs are numbered."""
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise CarpruneError(f"cannot load the data factory {name!r} ({exc}); give "
                            "package.module:function importable from here") from None
    made = factory(**({"image_size": image_size} if image_size is not None else {}))
    if isinstance(made, Data):
        return made
    if isinstance(made, dict):
        made = tuple(made.get(s) for s in ("train", "val", "test"))
    if not isinstance(made, (tuple, list)) or len(made) != 3 or any(s is None for s in made):
        raise CarpruneError(f"the data factory {name!r} must return (train, val, test) "
                            "Datasets or DataLoaders, or a dict with those keys")
    train, val, test = (s.dataset if isinstance(s, DataLoader) else s for s in made)
    classes = getattr(val, "classes", None) or _numbered_outputs(model, val, name)
    return Data(name=f"factory:{name}", train=train, val=val, test=test,
                classes=list(map(str, classes)), mean=IMAGENET_STATS[0], std=IMAGENET_STATS[1],
                meta={"factory": name}, workers=default_workers() if workers is None else workers,
                augment=False)


def _numbered_outputs(model: nn.Module | None, val, name: str) -> list[str]:
    if model is None:
        raise CarpruneError(f"the data factory {name!r} gives no class names (no .classes on "
                            "its val set); give them, or use it with a model")
    with torch.inference_mode():
        out = model.eval()(val[0][0][None].to(device_of(model)))
    return [str(c) for c in range(out.shape[-1])]

