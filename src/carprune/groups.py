"""Prunable units: Torch-Pruning dependency groups, their ablation masks, and surgery.

A *unit* is output channel `i` of a named conv layer together with everything Torch-Pruning's
`DependencyGraph` says must go with it (the BatchNorm channel, coupled residual producers,
consumers' input channels). Two operations:

- *ablate*: zero every producing parameter of the group (conv/linear weight rows and biases,
  norm scales and shifts), so the channel is identically zero downstream. For activations with
  f(0) = 0 this is exactly the network with the unit removed; it is how units are scored.
- *remove*: physical removal through Torch-Pruning, once a unit is chosen.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .errors import CarpruneError

NORMS = (_BatchNorm, _InstanceNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Unit:
    """Output channel `channel` (current numbering) of conv layer `layer`."""

    layer: str
    channel: int

    @property
    def units(self) -> tuple[Unit, ...]:
        return (self,)


@dataclass(frozen=True)
class Block:
    """Channels `channels` (current numbering) of conv layer `layer`, whose absence is scored
    jointly: one candidate of global CAR's block mode."""

    layer: str
    channels: tuple[int, ...]

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(Unit(self.layer, c) for c in self.channels)


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's graph of which channels must go together, or one sentence why not."""
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning raises many kinds on odd graphs
        raise CarpruneError(f"Torch-Pruning cannot build the dependency graph of this network "
                            f"({type(exc).__name__}: {str(exc)[:200]}); it cannot be pruned "
                            "here, see docs/models-and-data.md for the networks that work") \
            from None


def replay_history(model: nn.Module, input_shape: Sequence[int], history: list) -> None:
    """Re-apply Torch-Pruning's recorded removals to a fresh instance of the architecture."""
    model.eval()
    dg = dependency_graph(model, torch.zeros(1, *input_shape))
    try:
        dg.load_pruning_history([[name, bool(out), [int(i) for i in idx]]
                                 for name, out, idx in history])
    except (AttributeError, IndexError, ValueError) as exc:
        raise CarpruneError(f"the pruning history in model.json does not apply to this "
                            f"architecture ({exc}); restore the model.json of the run") from None


class Surgery:
    """Owns a copy of a model and its dependency graph; ablates and removes units, and keeps
    their numbering. The caller's model is never changed (`adopt` takes one over instead).

    `alive[layer]` maps the layer's current channel positions to its original indices, so every
    record can speak the numbering of the network the user started from.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor,
                 prior_history: list | None = None):
        self._own(copy.deepcopy(model), example_inputs, None, prior_history)

    @classmethod
    def adopt(cls, dg: tp.DependencyGraph, example_inputs: torch.Tensor) -> Surgery:
        """A surgery of the very model `dg` (Torch-Pruning's own graph) was built on, not of a
        copy: what it removes, that model loses."""
        surgery = cls.__new__(cls)
        surgery._own(dg.model, example_inputs, dg, None)
        return surgery

    def _own(self, model: nn.Module, example_inputs: torch.Tensor,
             dg: tp.DependencyGraph | None, prior_history: list | None) -> None:
        self.model = model.eval().to(memory_format=torch.channels_last)  # ~2x faster on CPU
        self.example_inputs = example_inputs
        self.dg = dg or dependency_graph(self.model, example_inputs)
        self.prior_history = list(prior_history or [])
        self.modules = dict(self.model.named_modules())
        self.names = {m: n for n, m in self.modules.items()}
        self.alive: dict[str, list[int]] = {
            name: list(range(m.out_channels)) for name, m in self.modules.items()
            if isinstance(m, nn.Conv2d)}
        # (layer, original indices, names of every module its group changed) per removal
        self.removals: list[tuple[str, list[int], frozenset[str]]] = []
        self._groups: dict[str, dict[int, list]] = {}  # layer -> channel -> group items
        self._grouped: dict[str, nn.Conv2d | None] = {}

    # -- naming -----------------------------------------------------------------------------
    def conv_layers(self) -> list[str]:
        """Layers whose filters can be pruned: convs with a dependency group, not depthwise."""
        return [n for n, m in self.modules.items()
                if isinstance(m, nn.Conv2d) and not is_depthwise(m) and m in self.dg.module2node
                and self.grouped_reader(n) is None]

    def check_layer(self, name: str) -> nn.Conv2d:
        if name not in self.modules:
            raise CarpruneError(f"the model has no layer {name!r}; prunable layers are: "
                                f"{', '.join(self.conv_layers())}")
        module = self.modules[name]
        grouped = self.grouped_reader(name) if isinstance(module, nn.Conv2d) else None
        if grouped is not None:
            raise CarpruneError(f"the channels of {name!r} feed a grouped convolution "
                                f"({self.names[grouped]}, groups={grouped.groups}), which cannot "
                                "lose single channels; choose another layer")
        if name not in self.conv_layers():
            raise CarpruneError(f"layer {name!r} is a {type(module).__name__}, not a prunable "
                                f"conv layer; choose from: {', '.join(self.conv_layers())}")
        return module

    def grouped_reader(self, layer: str) -> nn.Conv2d | None:
        """A grouped (not depthwise) convolution in the layer's dependency group, if any
        (RegNet, ResNeXt): removing one channel would break its groups."""
        if layer not in self._grouped:
            self._grouped[layer] = next(
                (dep.target.module for dep, _ in self.group(layer, [0])
                 if isinstance(dep.target.module, nn.Conv2d) and dep.target.module.groups > 1
                 and not is_depthwise(dep.target.module)), None)
        return self._grouped[layer]

    def size(self, layer: str) -> int:
        return self.modules[layer].out_channels

    # -- groups -----------------------------------------------------------------------------
    def group(self, layer: str, channels: Sequence[int]):
        return self.dg.get_pruning_group(self.modules[layer], tp.prune_conv_out_channels,
                                         [int(c) for c in channels])

    def unit_group(self, layer: str, channel: int) -> list:
        """(dependency, indices) items of one unit's group. One Torch-Pruning group of the whole
        layer is built (and cached until the next removal); a unit's items are the indices whose
        root index is the unit's channel."""
        if layer not in self._groups:
            units: dict[int, list] = {c: [] for c in range(self.size(layer))}
            for item in self.group(layer, range(self.size(layer))):
                mine: dict[int, list[int]] = {}
                for i, root in zip(item.idxs, item.root_idxs, strict=True):
                    mine.setdefault(root, []).append(i)
                for c, idxs in mine.items():
                    units[c].append((item.dep, idxs))
            self._groups[layer] = units
        return self._groups[layer][channel]

    def producing(self, layer: str, channel: int) -> dict[str, list[int]]:
        """Module name -> output indices of everything whose parameters make the unit's channel
        (conv and linear rows, depthwise convs, affine norms): ablating the unit zeroes those
        outputs, and nothing else."""
        out: dict[str, list[int]] = {}
        for dep, idxs in self.unit_group(layer, channel):
            m = dep.target.module
            is_out = self.dg.is_out_channel_pruning_fn(dep.handler)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and (is_out or is_depthwise(m)) \
                    or isinstance(m, NORMS) and getattr(m, "affine", True):
                name = self.names[m]
                out[name] = sorted({*out.get(name, []), *idxs})
        return out

    def producers(self, layer: str, channel: int) -> list[tuple[torch.Tensor, list[int]]]:
        """(parameter, indices along dim 0) of everything that produces the unit's channel."""
        return [(p, idxs) for name, idxs in self.producing(layer, channel).items()
                for p in (self.modules[name].weight, self.modules[name].bias) if p is not None]

    def consumers(self, layer: str, channel: int) -> list[tuple[str, list[int]]]:
        """(layer name, input indices) of every conv/linear that reads the unit's channel."""
        names = {m: n for n, m in self.modules.items()}
        out = []
        for dep, idxs in self.unit_group(layer, channel):
            m = dep.target.module
            if isinstance(m, (nn.Conv2d, nn.Linear)) and self.dg.is_in_channel_pruning_fn(
                    dep.handler) and not is_depthwise(m):
                out.append((names[m], list(idxs)))
        return out

    def kind(self, layer: str) -> str:
        """The layer's unit kind: depthwise (a depthwise conv carries its channels), residual
        (other layers make the same channels: a residual stage, a squeeze-excitation scale),
        concat (a consumer reads them among other layers' channels), branch (several layers
        read them) or plain."""
        if any(is_depthwise(self.modules[n]) for n in self.producing(layer, 0)):
            return "depthwise"
        if self.coupled(layer, depthwise=False):
            return "residual"
        consumers = self.consumers(layer, 0)
        if any(isinstance(self.modules[n], nn.Conv2d)
               and self.modules[n].in_channels != self.size(layer) for n, _ in consumers):
            return "concat"
        return "branch" if len(consumers) > 1 else "plain"

    def coupled(self, layer: str, depthwise: bool = True) -> bool:
        """True when other layers make the same channels: residual sums, and (unless
        `depthwise` is False) depthwise convs."""
        makers = [n for n in self.producing(layer, 0)
                  if isinstance(self.modules[n], (nn.Conv2d, nn.Linear))
                  and (depthwise or not is_depthwise(self.modules[n]))]
        return len(makers) > 1

    # -- operations -------------------------------------------------------------------------
    @contextlib.contextmanager
    def ablated(self, units: Sequence[Unit]) -> Iterator[None]:
        """Zero the units' producing parameters for the duration of the block, then restore."""
        saved = []
        with torch.no_grad():
            for unit in units:
                for param, idxs in self.producers(unit.layer, unit.channel):
                    saved.append((param, idxs, param[idxs].clone()))
                    param[idxs] = 0
        try:
            yield
        finally:
            with torch.no_grad():
                for param, idxs, values in reversed(saved):
                    param[idxs] = values

    def check_removal(self, layer: str, channels: Sequence[int]) -> None:
        if len(set(channels)) >= self.size(layer):
            raise CarpruneError(f"removing {len(set(channels))} of {self.size(layer)} filters "
                                f"would empty layer {layer!r}; keep at least one")

    def remove(self, layer: str, channels: Sequence[int]) -> list[int]:
        """Physically remove channels (current numbering); returns their original indices."""
        channels = sorted({int(c) for c in channels})
        self.check_removal(layer, channels)
        group = self.group(layer, channels)
        touched = {}
        for dep, idxs in group:
            m = dep.target.module
            if isinstance(m, nn.Conv2d) and (self.dg.is_out_channel_pruning_fn(dep.handler)
                                             or is_depthwise(m)):
                touched[self.names[m]] = sorted(set(idxs))
        original = [self.alive[layer][c] for c in channels]
        changed = frozenset(self.names[dep.target.module] for dep, _ in group
                            if dep.target.module in self.names)
        group.prune()
        self.model.to(memory_format=torch.channels_last)  # pruned weights come back dense NCHW
        self._groups.clear()
        for name, idxs in touched.items():
            gone = set(idxs)
            self.alive[name] = [o for pos, o in enumerate(self.alive[name]) if pos not in gone]
        self.removals.append((layer, original, changed))
        return original

    def history(self) -> list:
        """The full Torch-Pruning history (earlier runs first), JSON-ready."""
        return self.prior_history + [[name, bool(out), [int(i) for i in idx]]
                                     for name, out, idx in self.dg.pruning_history()]
