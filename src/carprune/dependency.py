"""Torch-Pruning's dependency graph of a network (which channels must go together), and the
replay of recorded removals on a fresh instance of an architecture."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from .errors import CarpruneError
from .layout import own_forward


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's graph of which channels must go together, or one sentence why not,
    blaming Torch-Pruning only when the network's own forward runs (`own_forward`). The graph
    is traced through autograd, so it is built with gradients on, whatever the caller's mode."""
    own_forward(model, example_inputs)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning raises many kinds on odd graphs
        raise CarpruneError(f"Torch-Pruning cannot build the dependency graph of this network, "
                            f"whose own forward runs ({type(exc).__name__}: {str(exc)[:200]}); "
                            "it cannot be pruned here, see docs/models-and-data.md for the "
                            "networks that work") from None


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
