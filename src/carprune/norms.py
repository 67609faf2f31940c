"""Norms that mix statistics across channels, and the network computed without some channels.

Zeroing a unit's producers equals removing it only through per-channel operations. A GroupNorm
or a LayerNorm over channels normalises each channel by statistics of several (a group, or all
of them at one position): a zeroed channel still counts in them, a removed one does not. So
wherever such a norm reads a unit's channels, the engines compute it as the pruned network
would (`without`): statistics over the channels that remain, then its affine map (and a timm
norm's dropout and activation), and zeros at the removed channels, which everything after it
then reads as nothing (docs/engine.md, "Scoring equals removal").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

# the norms whose forward `without` reproduces, by class name (torch's, torchvision's, timm's)
_GROUP_NORMS = {"GroupNorm", "GroupNorm1", "GroupNormAct", "GroupNorm1Act"}
_LAST_DIM = {"LayerNorm", "LayerNormAct", "LayerNormFp32", "LayerNormActFp32"}
_FIRST_DIM = {"LayerNorm2d", "LayerNormAct2d", "LayerNorm2dFp32", "LayerNormAct2dFp32"}

Mask = tuple[int, torch.Tensor, torch.Tensor]  # (candidates k, candidate rows, channels)


def is_mixing(m: nn.Module) -> bool:
    """A norm whose statistics span several channels."""
    return isinstance(m, (nn.GroupNorm, nn.LayerNorm))


def channel_dim(m: nn.Module) -> int:
    """The dimension of the module's output that holds its channels: the last for nn.Linear and
    a LayerNorm over the last dimension (channels-last), 1 for convs and the other norms."""
    if isinstance(m, nn.Linear):
        return -1
    if isinstance(m, nn.LayerNorm):
        return 1 if type(m).__name__ in _FIRST_DIM else -1
    return 1


def unsupported(m: nn.Module, reads: bool = False) -> str | None:
    """Why carprune cannot compute this module without some of its channels, or None: a norm
    that mixes them in a way it does not know, or (`reads`: it reads them) a conv that
    standardises its weights over its input channels (timm's StdConv2d, ScaledStdConv2d)."""
    kind = type(m).__name__
    if reads and "StdConv" in kind:
        return (f"is read by a {kind}, which standardises its weights over its input channels, "
                "so removing one reweighs the others (carprune cannot score that as removal)")
    if not is_mixing(m):
        return None
    if isinstance(m, nn.GroupNorm):
        known = kind in _GROUP_NORMS
    else:
        known = kind in _LAST_DIM | _FIRST_DIM and len(m.normalized_shape) == 1
    if known:
        return None
    return (f"reaches a {kind} that normalises across channels in a way carprune cannot "
            "compute without some of them (it knows torch's, torchvision's and timm's "
            "GroupNorm and LayerNorm over the channels alone)")


def _along(t: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along dimension `dim` of an ndim tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return t.view(shape)


def _standardised(v: torch.Tensor, keep: torch.Tensor, dims: tuple[int, ...],
                  eps: float) -> torch.Tensor:
    """(v - mean) / sqrt(var + eps) with mean and (biased) variance over `dims`, counting only
    where `keep` (broadcast to v) is 1; zero where it is 0."""
    count = keep.sum(dims, keepdim=True)
    for d in dims:
        if keep.shape[d] == 1:
            count = count * v.shape[d]
    mean = (v * keep).sum(dims, keepdim=True) / count
    centred = (v - mean) * keep
    var = (centred * centred).sum(dims, keepdim=True) / count
    return centred * torch.rsqrt(var + eps)


def without(module: nn.Module, x: torch.Tensor, mask: Mask) -> torch.Tensor:
    """`module(x)` for k candidates' batches stacked along dimension 0, each computed without
    its channels (`mask`: channel cols[i] is gone for candidate rows[i]); `module(x)` itself
    when no channel is gone."""
    k, rows, cols = mask
    if not len(rows):
        return module(x)
    dim = channel_dim(module) % x.ndim
    c = x.shape[dim]
    keep = torch.ones(k, c, dtype=x.dtype, device=x.device)
    keep[rows, cols] = 0
    if isinstance(module, nn.GroupNorm):
        g = module.num_groups
        v = x.reshape(k, -1, g, c // g, x[0, 0].numel())
        y = _standardised(v, keep.view(k, 1, g, c // g, 1), (3, 4), module.eps).view(x.shape)
    else:
        v = x.movedim(dim, -1)
        shape = v.shape
        y = _standardised(v.reshape(k, -1, c), keep.view(k, 1, c), (2,), module.eps)
        y = y.view(shape).movedim(-1, dim)
    if module.weight is not None:
        y = y * _along(module.weight, dim, y.ndim)
    if module.bias is not None:
        y = y + _along(module.bias, dim, y.ndim)
    for after in (getattr(module, "drop", None), getattr(module, "act", None)):
        y = y if after is None else after(y)
    shape = [k, -1] + [1] * (x.ndim - 1)
    shape[dim + 1] = c
    return (y.reshape(k, -1, *x.shape[1:]) * keep.view(shape)).reshape(x.shape)


@contextlib.contextmanager
def removed(modules: dict[nn.Module, Sequence[int]]) -> Iterator[None]:
    """Each mixing norm computes without the given channels for the duration of the block
    (forward hooks: the naive engine's ablation)."""
    hooks = []
    for module, channels in modules.items():
        def hook(m, args, output, channels=sorted(channels)):
            cols = torch.tensor(channels, dtype=torch.long, device=args[0].device)
            return without(m, args[0], (1, torch.zeros_like(cols), cols))
        hooks.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
