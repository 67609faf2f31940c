"""The scoring and test images of `make real`, labelled by the unpruned network itself
(`--labels model`), so that every figure is agreement with the original: windows of the
photographs that ship inside packages (scoring and test from different photographs), or two
folders of the user's images (the paper's ImageNet setting)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import carprune as cp

from .networks import Network

SCORING_PHOTOS = ("astronaut", "coffee", "rocket", "china", "bus", "department_store", "group")
TEST_PHOTOS = ("chelsea", "grace_hopper", "flower", "motorcycle", "zidane", "luispedro")


@dataclass
class Split:
    """Scoring and test images (normalised) with their labels."""
    scoring: TensorDataset
    test: TensorDataset
    info: dict = field(default_factory=dict)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def normalised(net: Network, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 255] as the network reads them."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (net.mean, net.std))
    return (pixels / 255 - mean) / std


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for images x (on the CPU), run folded (`cp.inference`), in batches
    of 64 on the model's device."""
    run = cp.inference(model)
    return torch.cat([run(b.to(device_of(model))).cpu() for b in x.split(64)])


def labelled(net: Network, pixels: torch.Tensor) -> TensorDataset:
    """Pixels in [0, 255] as the network reads them, labelled by the network."""
    x = normalised(net, pixels)
    with torch.no_grad():  # not inference mode: Taylor pruning takes gradients on these
        return TensorDataset(x, logits(net.model, x).argmax(1))


@torch.inference_mode()
def agreement(model: nn.Module, data: TensorDataset) -> dict[str, float]:
    """Share of images on which `model` keeps the unpruned network's label: top-1, and top-5
    (the label among its five best) when it has more than five classes."""
    x, y = data.tensors
    out = logits(model, x)
    result = {"top1": float((out.argmax(1) == y).float().mean())}
    if out.shape[1] > 5:
        result["top5"] = float((out.topk(5, 1).indices == y[:, None]).any(1).float().mean())
    return result


def _windows(photos: dict, n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    per_photo = math.ceil(n / (2 * len(photos)))
    pixels, origin = cp.data.photo_windows(photos, per_photo, seed=seed, size=size,
                                           min_side=size // 2, max_fraction=0.9)
    pick = np.sort(np.random.default_rng(seed).choice(len(pixels), n, replace=False))
    return pixels[pick], [origin[i]["photo"] for i in pick]


def photo_split(net: Network, scoring_images: int, test_images: int, seed: int) -> Split:
    """Windows of SCORING_PHOTOS to score on and of TEST_PHOTOS to test on."""
    photos = cp.data.package_photos(SCORING_PHOTOS + TEST_PHOTOS)
    missing = sorted(set(SCORING_PHOTOS + TEST_PHOTOS) - set(photos))
    if missing:
        raise cp.CarpruneError(f"photos {', '.join(missing)} are missing: they ship in "
                               "scikit-image, scikit-learn, ultralytics, mahotas and "
                               "insightface; run make real, which installs them")
    parts = [{k: photos[k] for k in names} for names in (SCORING_PHOTOS, TEST_PHOTOS)]
    sizes = (scoring_images, test_images)
    (xs, ps), (xt, pt) = (_windows(p, n, net.size, seed + i)
                          for i, (p, n) in enumerate(zip(parts, sizes, strict=True)))
    scoring, test = (labelled(net, x) for x in (xs, xt))
    info = {name: {"photos": {k: list(v.shape) for k, v in part.items()}, "windows": len(x),
                   "per_photo": {k: origin.count(k) for k in part},
                   "classes_seen": len(set(d.tensors[1].tolist()))}
            for name, part, x, origin, d in (("scoring", parts[0], xs, ps, scoring),
                                             ("test", parts[1], xt, pt, test))}
    return Split(scoring, test, info)


def folder_images(net: Network, root: Path, n: int, seed: int,
                  folder_labels: bool) -> TensorDataset:
    """The first n images of `root` in `cp.data.image_folder`'s seeded order (the whole folder
    as its val split), read as
    torchvision's ImageNet evaluation reads them (the shorter side to size / 0.875, then the
    centre) and normalised for `net`; labelled by their class subfolders (sorted) when
    `folder_labels`, else by the network."""
    pre = {**cp.data.preprocess_for(None, net.size), "mean": list(net.mean),
           "std": list(net.std)}
    data = cp.data.image_folder(root, pre, val_fraction=1.0, test_fraction=0.0, seed=seed)
    if folder_labels and data.meta["unlabelled"]:
        raise cp.CarpruneError(f"{root} has no class subfolders; use --labels model or lay it "
                               "out as root/<class>/*.jpg")
    images, labels = zip(*(data.val[i] for i in range(min(n, len(data.val)))), strict=True)
    x = torch.stack(images)
    if folder_labels:
        return TensorDataset(x, torch.tensor(labels))
    with torch.no_grad():
        return TensorDataset(x, logits(net.model, x).argmax(1))


def folder_split(net: Network, scoring: Path, test: Path, sizes: tuple[int, int], seed: int,
                 folder_labels: bool) -> Split:
    """Scoring and test images from two folders (other photographs), labelled by the network,
    or by their subfolders when `folder_labels` (then "agreement" is accuracy)."""
    parts = [folder_images(net, root, n, seed + i, folder_labels)
             for i, (root, n) in enumerate(zip((scoring, test), sizes, strict=True))]
    info = {name: {"folder": str(root), "windows": len(d), "photos": [str(root)],
                   "classes_seen": len(set(d.tensors[1].tolist()))}
            for name, root, d in (("scoring", scoring, parts[0]), ("test", test, parts[1]))}
    return Split(*parts, info)
