"""The memory layout carprune computes a network in: an optimisation, never a requirement.

channels_last runs convolutions about twice as fast on CPU, but a network whose own code
assumes the default layout (`x.view(x.size(0), -1)` after its convs, as countless user models
flatten) fails in it. So the layout is decided once per network, by one forward pass in each
layout: channels_last where it runs and gives the same outputs, else the network's own
contiguous layout, with one warning. The decision is kept on the model (`ATTRIBUTE`, which
copies keep); every place that converts a network or its images asks `layout_for`.
"""

from __future__ import annotations

import contextlib
import copy
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .devices import check_float32, device_of
from .errors import CarpruneError

ATTRIBUTE = "carprune_layout"  # tests set it to force a layout
RTOL, ATOL = 1e-4, 1e-5  # atol relative to the largest output: rounding differs by layout
_LIBRARIES = (Path(torch.__file__).parent, Path(__file__).parent)


def layout_for(model: nn.Module, example: torch.Tensor) -> torch.memory_format:
    """channels_last or torch.contiguous_format for `model`, decided on its first call (one
    forward pass of a copy in each layout on `example`, eval mode, no grad) and kept on the
    model; the model itself is not changed but for that attribute. The first look carprune
    takes at a network, so a network it cannot work with is refused here."""
    decided = getattr(model, ATTRIBUTE, None)
    if decided is not None:
        return decided
    check_float32(model)
    trial = copy.deepcopy(model).eval()
    example = example.to(device_of(model))
    with _full_precision():
        own = own_forward(trial.to(memory_format=torch.contiguous_format), example)
        trial.to(memory_format=torch.channels_last)
        try:
            with torch.no_grad():
                fast = trial(arranged(example, torch.channels_last))
        except Exception as exc:  # noqa: BLE001 - whatever the network's code raises here
            why = f"({type(exc).__name__}: {first_line(exc)})"
        else:
            why = _difference(_tensors(own), _tensors(fast))
    layout = torch.channels_last if why is None else torch.contiguous_format
    if why is not None:
        warnings.warn(f"this network does not run in channels_last layout {why}; carprune "
                      "keeps its contiguous layout (slower on CPU)", stacklevel=2)
    setattr(model, ATTRIBUTE, layout)
    return layout


def arrange(model: nn.Module, example: torch.Tensor) -> torch.memory_format:
    """Put the model's weights in its layout (`layout_for`), in place; returns the layout, in
    which its images go too (`arranged`)."""
    layout = layout_for(model, example)
    model.to(memory_format=layout)
    return layout


def arranged(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """A batch of images in `layout` (x itself when it already is); other tensors as they are."""
    return x.contiguous(memory_format=layout) if x.ndim == 4 else x


def example_of(shape) -> torch.Tensor:
    """One image of `shape` (C, H, W), the same every time, to decide a layout on."""
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))


def own_forward(model: nn.Module, example: torch.Tensor):
    """The network's output on `example` (no grad), or one sentence naming the line of the
    network's own code that fails, so that no one else (Torch-Pruning, a layout) is blamed."""
    try:
        with torch.no_grad():
            return model(example)
    except Exception as exc:  # noqa: BLE001 - whatever the network's code raises
        shape = "x".join(map(str, example.shape))
        raise CarpruneError(f"the network's own forward fails on a {shape} example "
                            f"({type(exc).__name__}: {first_line(exc)}){_where(exc)}; fix "
                            "its forward, or give images of the size it expects") from exc


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """TF32 off while the layouts are compared: cuDNN convolutions use it by default on recent
    GPUs, and its rounding (1e-3) would hide a layout's (1e-7) behind an algorithm's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _where(exc: BaseException) -> str:
    """' in FILE:LINE' of the last frame of the traceback outside torch and carprune (the
    network's code), or '' when every frame is theirs."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not any(Path(f.filename).is_relative_to(lib) for lib in _LIBRARIES)]
    if not frames:
        return ""
    path = Path(frames[-1].filename)
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    return f" in {shown}:{frames[-1].lineno}"


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a network's output: a tensor, or a tuple, list or dict of them."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def _difference(own: list[torch.Tensor], fast: list[torch.Tensor]) -> str | None:
    """Why the channels_last outputs are not the contiguous ones (None when they are, up to
    rounding: rtol RTOL, atol ATOL times the largest output)."""
    if [t.shape for t in own] != [t.shape for t in fast]:
        return "(its outputs change shape)"
    for a, b in zip(own, fast, strict=True):
        if not a.is_floating_point():
            same = torch.equal(a, b)
        else:
            atol = ATOL * float(a.abs().max()) if a.numel() else 0.0
            same = torch.allclose(b, a, rtol=RTOL, atol=atol, equal_nan=True)
        if not same:
            return "(its outputs change, beyond rounding)"
    return None
