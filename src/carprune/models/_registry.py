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
    """Build a zoo model by name, or any factory given as `package.module:function`."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except ModuleNotFoundError as exc:
            hint = " (pip install torchvision)" if exc.name == "torchvision" else ""
            raise CarpruneError(f"cannot import {module_name!r} for model {name!r}: "
                                f"{exc}{hint}") from None
        except AttributeError:
            raise CarpruneError(f"{module_name!r} has no factory {attr!r}; check the "
                                "name after the colon") from None
        return factory(**kwargs)
    if name not in _MODELS:
        raise CarpruneError(f"unknown model {name!r}; choose one of {', '.join(list_models())} "
                            "or give a factory as package.module:function")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as exc:
        raise CarpruneError(f"model {name!r} does not take these arguments ({exc})") from None
