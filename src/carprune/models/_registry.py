"""Model registry: families register their constructors; `create_model` is the public door."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from ..errors import CarpruneError

_MODELS: dict[str, Callable[..., nn.Module]] = {}

DEBUG_HINT = "carprune --debug COMMAND ... prints its traceback"


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
        return _call_factory(name, kwargs)
    if name not in _MODELS:
        raise CarpruneError(f"unknown model {name!r}; choose one of {', '.join(list_models())}, "
                            "timm:NAME, or a factory as package.module:function")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as exc:
        raise CarpruneError(f"model {name!r} does not take these arguments ({exc})") from None


def _call_factory(name: str, kwargs: dict) -> nn.Module:
    """The user's code runs here: what it raises or returns is told in one sentence, and the
    original exception stays chained (`from exc`) for `carprune --debug` to print."""
    factory = _factory(name)
    try:
        model = factory(**kwargs)
    except CarpruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the user's code is reported
        raise CarpruneError(f"the factory {name} failed ({_described(exc)}); fix it so that "
                            f"{name}() returns the network ({DEBUG_HINT})") from exc
    if not isinstance(model, nn.Module):
        shown = repr(model)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise CarpruneError(f"the factory {name} returned {type(model).__name__} {shown}, not "
                            "a network; a model factory must return a torch.nn.Module")
    return model


def _factory(name: str) -> Callable[..., nn.Module]:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CarpruneError(f"cannot import {module_name!r} for model {name!r}: {exc}; install "
                            "the package that defines it") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise CarpruneError(f"importing {module_name!r} for model {name!r} failed "
                            f"({_described(exc)}); fix the module ({DEBUG_HINT})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise CarpruneError(f"{module_name!r} has no factory {attr!r}; check the name after the "
                            "colon") from None


def _timm(arch: str, kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise CarpruneError(f"timm has no model {arch!r}; see timm.list_models() for the names")
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - timm raises many kinds for a bad build
        raise CarpruneError(f"timm could not build {arch!r} ({_described(exc)}); check its "
                            f"arguments or choose another timm:NAME ({DEBUG_HINT})") from exc


def _described(exc: BaseException) -> str:
    """`ExcType: message` on one line, so that the error stays one sentence."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
