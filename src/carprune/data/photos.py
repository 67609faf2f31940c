"""Photographs that ship inside packages: real RGB images for scoring a pretrained RGB network
without downloading anything. matplotlib (a dependency) ships Grace Hopper's portrait;
scikit-image, when installed (`make rgb`, `make real`), ships more in skimage/data;
scikit-learn two in sklearn/datasets/images, and ultralytics, mahotas and insightface five more
(`make real`, installed --no-deps for their photos alone). Found with importlib.util.find_spec,
so no package is imported."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CarpruneError

PACKAGE_PHOTOS = (
    ("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("astronaut", "skimage", "data/astronaut.png"),
    ("chelsea", "skimage", "data/chelsea.png"),
    ("coffee", "skimage", "data/coffee.png"),
    ("rocket", "skimage", "data/rocket.jpg"),
    ("motorcycle", "skimage", "data/motorcycle_left.png"),
    ("china", "sklearn", "datasets/images/china.jpg"),
    ("flower", "sklearn", "datasets/images/flower.jpg"),
    ("bus", "ultralytics", "assets/bus.jpg"),
    ("zidane", "ultralytics", "assets/zidane.jpg"),
    ("department_store", "mahotas", "demos/data/DepartmentStore.jpg"),
    ("luispedro", "mahotas", "demos/data/luispedro.jpg"),
    ("group", "insightface", "data/images/t1.jpg"),
)
# The photos every caller got before scikit-learn's were added (so MTCNN's figures stay put).
DEFAULT_PHOTOS = ("grace_hopper", "astronaut", "chelsea", "coffee", "rocket", "motorcycle")


def package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed top-level package, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / relative).is_file():
            return Path(folder) / relative
    return None


def package_photos(names: Sequence[str] = DEFAULT_PHOTOS) -> dict[str, np.ndarray]:
    """The photographs `names` of PACKAGE_PHOTOS that the installed packages ship, by name, as
    uint8 (H, W, 3) RGB arrays, in PACKAGE_PHOTOS' order."""
    from PIL import Image

    photos = {}
    for name, package, relative in PACKAGE_PHOTOS:
        path = package_file(package, relative) if name in names else None
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
