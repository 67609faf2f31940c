"""Model registry: families register their constructors; `create_model` is the public door."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from ..errors import CarpruneError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a zoo model by name, a timm model as `timm:NAME` (timm.create_model's names), or
    any factory given as `package.module:function`. Nothing is downloaded: pretrained weights
    come from a file (`--weights`)."""
    if kwargs.get("pretrained") or kwargs.get("weights"):
        raise CarpruneError(f"model {name!r} would download pretrained weights; carprune never "
                            "fetches at run time: build it without them and give --weights FILE")
    if name.startswith("timm:"):
        return _timm(name.partition(":")[2], kwargs)
    if ":" in name:
        return _factory(name)(**kwargs)
    if name not in _MODELS:
        raise CarpruneError(f"unknown model {name!r}; choose one of {', '.join(list_models())}, "
                            "timm:NAME, or a factory as package.module:function")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as exc:
        raise CarpruneError(f"model {name!r} does not take these arguments ({exc})") from None


def _factory(name: str) -> Callable[..., nn.Module]:
    module_name, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except ModuleNotFoundError as exc:
        raise CarpruneError(f"cannot import {module_name!r} for model {name!r}: {exc}; install "
                            "the package that defines it") from None
    except AttributeError:
        raise CarpruneError(f"{module_name!r} has no factory {attr!r}; check the name after the "
                            "colon") from None


def _timm(arch: str, kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise CarpruneError(f"timm has no model {arch!r}; see timm.list_models() for the names")
    return timm.create_model(arch, pretrained=False, **kwargs)
