"""Prunable units: Torch-Pruning dependency groups, their ablation, and surgery.

A *unit* of a conv or linear layer is what Torch-Pruning removes together (docs/engine.md,
"Units"): one output channel, or, where the layer's group holds grouped convolutions or
GroupNorms, the same channel of each of their G groups; with everything the `DependencyGraph`
says must go with it (norm channels, residual producers, consumers' inputs). Two operations:

- *ablate*: zero every producing parameter of the group (conv/linear weight rows and biases,
  norm scales and shifts), so the channels are identically zero downstream, and compute the
  norms that mix channels without them (norms.py). That is exactly the network with the unit
  removed; it is how units are scored.
- *remove*: physical removal through Torch-Pruning, once a unit is chosen.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .dependency import dependency_graph
from .errors import CarpruneError
from .layout import arrange, layout_for
from .norms import is_mixing, removed, unsupported
from .trial import refusals, verdicts
from .units import Unit

NORMS = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)
LAYERS = (nn.Conv2d, nn.Linear)


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1


def out_width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _split(m: nn.Module, handler, dg: tp.DependencyGraph) -> tuple[int, int]:
    """(groups, channels) of a member of a dependency group along the dimension the group
    prunes: a grouped (not depthwise) conv's, a GroupNorm's; (1, 0) for the others."""
    if isinstance(m, nn.GroupNorm):
        return m.num_groups, m.num_channels
    if isinstance(m, nn.Conv2d) and m.groups > 1 and not is_depthwise(m):
        out = dg.is_out_channel_pruning_fn(handler)
        return m.groups, m.out_channels if out else m.in_channels
    return 1, 0


class _Alive(Mapping):
    """Layer -> the original unit index of each current unit position: that of its channel in
    the first channel group (a unit takes the same channel of every group)."""

    def __init__(self, surgery: Surgery):
        self._surgery = surgery

    def __getitem__(self, layer: str) -> list[int]:
        return self._surgery.original[layer][:self._surgery.size(layer)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._surgery.original)

    def __len__(self) -> int:
        return len(self._surgery.original)


class Surgery:
    """Owns a copy of a model and its dependency graph; ablates and removes units, and keeps
    their numbering. The caller's model is never changed, but for the decisions it keeps (its
    layout, layout.py; its layers' trials, trial.py); `adopt` takes one over instead.

    `alive[layer]` maps the layer's current unit positions to their original indices, so every
    record can speak the numbering of the network the user started from (`original[layer]`:
    the same per channel).
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor,
                 prior_history: list | None = None):
        layout_for(model, example_inputs)  # decided once, on the caller's model: copies keep it
        self._own(copy.deepcopy(model), example_inputs, None, prior_history)
        self._trials = verdicts(model)  # the same: trial.py

    @classmethod
    def adopt(cls, dg: tp.DependencyGraph, example_inputs: torch.Tensor) -> Surgery:
        """A surgery of the very model `dg` (Torch-Pruning's own graph) was built on, not of a
        copy: what it removes, that model loses."""
        surgery = cls.__new__(cls)
        surgery._own(dg.model, example_inputs, dg, None)
        surgery._trials = verdicts(dg.model)
        return surgery

    def _own(self, model: nn.Module, example_inputs: torch.Tensor,
             dg: tp.DependencyGraph | None, prior_history: list | None) -> None:
        self.model = model.eval()
        self.layout = arrange(self.model, example_inputs)  # channels_last where it works
        self.example_inputs = example_inputs
        self.dg = dg or dependency_graph(self.model, example_inputs)
        self.prior_history = list(prior_history or [])
        self.modules = dict(self.model.named_modules())
        self.names = {m: n for n, m in self.modules.items()}
        self.original: dict[str, list[int]] = {
            name: list(range(out_width(m))) for name, m in self.modules.items()
            if isinstance(m, LAYERS)}
        self.alive = _Alive(self)
        # (layer, original unit indices, names of every module its group changed) per removal
        self.removals: list[tuple[str, list[int], frozenset[str]]] = []
        self._units: dict[str, list[list]] = {}  # layer -> unit -> group items, until a removal
        self._groups_of: dict[str, int] = {}     # layer -> channel groups G (never changes)
        self._refusals: dict[str, str | None] = {}

    # -- naming -----------------------------------------------------------------------------
    def prunable_layers(self) -> list[str]:
        """Layers whose units can be pruned: every conv and linear layer that makes the
        channels of a dependency group, but depthwise convs and the classifier (docs/engine.md,
        "Units")."""
        return [n for n, m in self.modules.items()
                if isinstance(m, LAYERS) and self.why_not(n) is None]

    def conv_layers(self) -> list[str]:
        """The convs among `prunable_layers`."""
        return [n for n in self.prunable_layers() if isinstance(self.modules[n], nn.Conv2d)]

    def check_layer(self, name: str, convs: bool = False) -> nn.Module:
        """The layer, or one sentence saying why it is not a prunable one (`convs`: a conv)."""
        module, wanted = self.modules.get(name), "conv" if convs else "conv or linear"
        why = self.why_not(name) if isinstance(module, nn.Conv2d if convs else LAYERS) else \
            f"is a {type(module).__name__}, not a prunable {wanted} layer"
        if why is None:
            return module
        pool = ", ".join(self.conv_layers() if convs else self.prunable_layers())
        if module is None:
            raise CarpruneError(f"the model has no layer {name!r}; prunable layers are: {pool}")
        raise CarpruneError(f"layer {name!r} {why}; choose from: {pool}")

    def why_not(self, layer: str) -> str | None:
        """Why the layer's channels are not units, or None when they are. The first question
        answers it for every layer: by its place in the graph, then, for those that pass, by a
        trial removal, all at once (trial.py; kept on the caller's model)."""
        if not isinstance(self.modules.get(layer), LAYERS):
            return "is not a conv or linear layer of the network"
        if layer not in self._refusals:
            layers = [n for n, m in self.modules.items()
                      if isinstance(m, LAYERS) and n not in self._refusals]
            for name in layers:
                self._refusals[name] = self._find_refusal(name)
            fresh = [n for n in layers if self._refusals[n] is None and n not in self._trials]
            found = refusals(self, fresh)
            self._trials.update({n: found.get(n) for n in fresh})
            for name in layers:
                self._refusals[name] = self._refusals[name] or self._trials[name]
        return self._refusals[layer]

    def _find_refusal(self, layer: str) -> str | None:
        module = self.modules[layer]
        if is_depthwise(module):
            return ("is a depthwise conv, whose channels go with the layer that makes them; "
                    "name that layer")
        if module not in self.dg.module2node:
            return "is not part of the network's forward pass"
        if not self.consumers(layer, 0):
            return ("makes the network's outputs (no layer reads its channels): removing one "
                    "would remove an output, not a filter")
        for dep, _ in self.unit_group(layer, 0):
            why = unsupported(dep.target.module, self.dg.is_in_channel_pruning_fn(dep.handler))
            if why:
                return f"{why}, at {self.names[dep.target.module]}"
        return self._uneven(layer)

    def _uneven(self, layer: str) -> str | None:
        """Why some member's channel groups would become unequal when a unit goes, or None."""
        if self.channel_groups(layer) == 1:
            return None
        for u in range(self.size(layer)):
            for dep, idxs in self.unit_group(layer, u):
                groups, width = _split(dep.target.module, dep.handler, self.dg)
                if groups == 1:
                    continue
                counts = [0] * groups
                for i in idxs:
                    counts[i // (width // groups)] += 1
                if len(set(counts)) > 1:
                    return (f"feeds {self.names[dep.target.module]} ({groups} channel groups) "
                            "unevenly: no removal of its channels keeps those groups equal")
        return None

    def channel_groups(self, layer: str) -> int:
        """G: the least common multiple of the group counts of the grouped convs (not
        depthwise) and GroupNorms in the layer's dependency group; 1 where there are none."""
        if layer not in self._groups_of:
            counts = [_split(item.dep.target.module, item.dep.handler, self.dg)[0]
                      for item in self.group(layer, range(self.width(layer)))]
            self._groups_of[layer] = math.lcm(1, *counts)
        return self._groups_of[layer]

    def width(self, layer: str) -> int:
        """The layer's output channels now."""
        return out_width(self.modules[layer])

    def size(self, layer: str) -> int:
        """The layer's units now."""
        return self.width(layer) // self.channel_groups(layer)

    def channels(self, layer: str, unit: int) -> list[int]:
        """The layer's channels (current numbering) that make up unit `unit`."""
        size = self.size(layer)
        return [unit + g * size for g in range(self.channel_groups(layer))]

    # -- groups -----------------------------------------------------------------------------
    def group(self, layer: str, channels: Sequence[int]):
        module = self.modules[layer]
        prune = tp.prune_linear_out_channels if isinstance(module, nn.Linear) \
            else tp.prune_conv_out_channels
        return self.dg.get_pruning_group(module, prune, [int(c) for c in channels])

    def unit_group(self, layer: str, unit: int) -> list:
        """(dependency, indices) items of one unit's group. One Torch-Pruning group of the whole
        layer is built (and cached until the next removal); a unit's items are the indices whose
        root index is one of the unit's channels."""
        if layer not in self._units:
            size = self.size(layer)
            units: list[list] = [[] for _ in range(size)]
            for item in self.group(layer, range(self.width(layer))):
                mine: dict[int, list[int]] = {}
                for i, root in zip(item.idxs, item.root_idxs, strict=True):
                    mine.setdefault(root % size, []).append(i)
                for u, idxs in mine.items():
                    units[u].append((item.dep, sorted(idxs)))
            self._units[layer] = units
        return self._units[layer][unit]

    def producing(self, layer: str, unit: int) -> dict[str, list[int]]:
        """Module name -> output indices of everything whose parameters make the unit's
        channels (conv and linear rows, depthwise convs, per-channel affine norms): ablating the
        unit zeroes those outputs, and nothing else."""
        out: dict[str, list[int]] = {}
        for dep, idxs in self.unit_group(layer, unit):
            m = dep.target.module
            is_out = self.dg.is_out_channel_pruning_fn(dep.handler)
            if isinstance(m, LAYERS) and (is_out or is_depthwise(m)) \
                    or isinstance(m, NORMS) and not is_mixing(m) and getattr(m, "affine", True):
                name = self.names[m]
                out[name] = sorted({*out.get(name, []), *idxs})
        return out

    def mixing(self, layer: str, unit: int) -> dict[str, list[int]]:
        """Module name -> channels of every norm that mixes channels (norms.py) and reads the
        unit's: they compute without those channels when the unit is ablated."""
        out: dict[str, list[int]] = {}
        for dep, idxs in self.unit_group(layer, unit):
            if is_mixing(dep.target.module):
                name = self.names[dep.target.module]
                out[name] = sorted({*out.get(name, []), *idxs})
        return out

    def makers(self, layer: str, unit: int) -> dict[str, list[int]]:
        """`producing` and `mixing` together: every module whose output at the unit's channels
        the unit's absence changes."""
        return {**self.producing(layer, unit), **self.mixing(layer, unit)}

    def producers(self, layer: str, unit: int) -> list[tuple[torch.Tensor, list[int]]]:
        """(parameter, indices along dim 0) of everything that produces the unit's channels."""
        return [(p, idxs) for name, idxs in self.producing(layer, unit).items()
                for p in (self.modules[name].weight, self.modules[name].bias) if p is not None]

    def consumers(self, layer: str, unit: int) -> list[tuple[str, list[int]]]:
        """(layer name, input indices) of every conv/linear that reads the unit's channels."""
        out = []
        for dep, idxs in self.unit_group(layer, unit):
            m = dep.target.module
            if isinstance(m, LAYERS) and self.dg.is_in_channel_pruning_fn(dep.handler) \
                    and not is_depthwise(m):
                out.append((self.names[m], list(idxs)))
        return out

    def kind(self, layer: str) -> str:
        """The layer's unit kind (docs/engine.md): norm-mixed (a norm that mixes channels reads
        them), grouped (units of several channels), depthwise (a depthwise conv carries them),
        residual (other layers make the same channels: a residual stage, a squeeze-excitation
        scale), linear (an nn.Linear's hidden features), concat (a consumer reads them among
        other layers' channels), branch (several layers read them) or plain."""
        if self.mixing(layer, 0):
            return "norm-mixed"
        if self.channel_groups(layer) > 1:
            return "grouped"
        if any(is_depthwise(self.modules[n]) for n in self.producing(layer, 0)):
            return "depthwise"
        if self.coupled(layer, depthwise=False):
            return "residual"
        if isinstance(self.modules[layer], nn.Linear):
            return "linear"
        consumers = self.consumers(layer, 0)
        if any(isinstance(self.modules[n], nn.Conv2d)
               and self.modules[n].in_channels != self.size(layer) for n, _ in consumers):
            return "concat"
        return "branch" if len(consumers) > 1 else "plain"

    def coupled(self, layer: str, depthwise: bool = True) -> bool:
        """True when other layers make the same channels: residual sums, and (unless
        `depthwise` is False) depthwise convs."""
        makers = [n for n in self.producing(layer, 0) if isinstance(self.modules[n], LAYERS)
                  and (depthwise or not is_depthwise(self.modules[n]))]
        return len(makers) > 1

    # -- operations -------------------------------------------------------------------------
    @contextlib.contextmanager
    def ablated(self, units: Sequence[Unit]) -> Iterator[None]:
        """The network without the units for the duration of the block: their producing
        parameters zeroed, and the norms that mix their channels computing without them."""
        saved, gone = [], {}
        with torch.no_grad():
            for unit in units:
                for param, idxs in self.producers(unit.layer, unit.channel):
                    saved.append((param, idxs, param[idxs].clone()))
                    param[idxs] = 0
                for name, idxs in self.mixing(unit.layer, unit.channel).items():
                    gone.setdefault(self.modules[name], set()).update(idxs)
        try:
            with removed(gone):
                yield
        finally:
            with torch.no_grad():
                for param, idxs, values in reversed(saved):
                    param[idxs] = values

    def check_removal(self, layer: str, units: Sequence[int]) -> None:
        if len(set(units)) >= self.size(layer):
            each = f" (a unit is one channel of each of its {self.channel_groups(layer)} " \
                "channel groups)" if self.channel_groups(layer) > 1 else ""
            raise CarpruneError(f"removing {len(set(units))} of {self.size(layer)} units would "
                                f"empty layer {layer!r}{each}; keep at least one")

    def remove(self, layer: str, units: Sequence[int]) -> list[int]:
        """Physically remove units (current positions); returns their original indices."""
        units = sorted({int(u) for u in units})
        self.check_removal(layer, units)
        original = [self.alive[layer][u] for u in units]
        group = self.group(layer, sorted(c for u in units for c in self.channels(layer, u)))
        touched = {}
        for dep, idxs in group:
            m = dep.target.module
            if isinstance(m, LAYERS) and (self.dg.is_out_channel_pruning_fn(dep.handler)
                                          or is_depthwise(m)):
                touched[self.names[m]] = set(idxs)
        changed = frozenset(filter(None, (  # a pruned parameter (a layer scale): its name
            self.names.get(dep.target.module) or self.dg._param_to_name.get(dep.target.module)
            for dep, _ in group)))
        group.prune()
        self.model.to(memory_format=self.layout)  # pruned weights come back dense NCHW
        self._units.clear()
        for name, gone in touched.items():
            self.original[name] = [o for pos, o in enumerate(self.original[name])
                                   if pos not in gone]
        self.removals.append((layer, original, changed))
        return original

    def history(self) -> list:
        """The full Torch-Pruning history (earlier runs first), JSON-ready."""
        return self.prior_history + [[name, bool(out), [int(i) for i in idx]]
                                     for name, out, idx in self.dg.pruning_history()]
