"""Torch-Pruning's global pruning to a MACs target (experiments/baselines.py): it stops at the
first step that reaches the target, measured by hand, and keeps the network it was given."""

import pytest
import torch
from torch import nn

from carprune.measure import macs_params

from .baselines import macs_share, torch_pruning_global

pytestmark = pytest.mark.experiment


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("importance,round_to", [("magnitude", 1), ("magnitude", 4),
                                                 ("taylor", 1)])
def test_stops_at_the_first_step_under_the_target(importance, round_to):
    model = small_net()
    x = torch.randn(8, 3, 8, 8)
    y = model(x).argmax(1)
    start = macs_params(model, (3, 8, 8))[0]
    seen = []

    def share(pruned: nn.Module) -> float:
        seen.append(macs_params(pruned, (3, 8, 8))[0] / start)
        return seen[-1]

    pruned = torch_pruning_global(model, x[:1], 0.6, importance, steps=20, round_to=round_to,
                                  data=(x, y), share=share)
    assert seen[-1] <= 0.6 < min(seen[:-1]) and seen[0] == 1.0
    assert seen == sorted(seen, reverse=True) and len(seen) > 2
    assert macs_share(model, x[:1])(pruned) == seen[-1]
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % round_to == 0 for w in widths) and sum(widths) < 64
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [16, 32, 16]
    assert isinstance(pruned[-1], nn.Linear) and pruned[-1].out_features == 4
