"""The global-vs-magnitude study on a few hundred Fashion-MNIST images: both methods reach the
MACs target, and the table's figures are the networks' own (fine-tuning leaves the pruned
networks as they were; the median is over the seeds' accuracies)."""

import statistics
from types import SimpleNamespace

import pytest
from torch import nn

import carprune as cp
from carprune.measure import macs_params

from .main import arguments, compared, pruned_both

pytestmark = pytest.mark.experiment


@pytest.fixture(scope="module")
def small():
    data = cp.data.fashion_mnist()
    first = cp.data.first_images
    return SimpleNamespace(train=first(data.train, 256, "train"), val=first(data.val, 64, "val"),
                           test=first(data.test, 256, "test"), input_shape=data.input_shape)


@pytest.mark.slow
def test_both_methods_reach_the_target_and_the_table_is_theirs(small):
    model = cp.load("convnet-fmnist")
    args = arguments(["--target-macs", "0.8", "--step", "8", "--screen", "16",
                      "--finetune-epochs", "1", "--seeds", "3"])
    pruned = pruned_both(model, small.val, small.input_shape, args)
    start = macs_params(model, small.input_shape)[0]
    assert set(pruned) == {"global CAR", "Torch-Pruning magnitude"}
    for net in pruned.values():
        assert macs_params(net, small.input_shape)[0] <= 0.8 * start
    before = {name: cp.evaluate(net, small.test).accuracy for name, net in pruned.items()}
    rows = compared(pruned, small, args)
    for name, net in pruned.items():
        row = rows[name]
        assert row["test_pruned"] == before[name] == cp.evaluate(net, small.test).accuracy
        assert len(row["test_finetuned_seeds"]) == 3
        assert row["test_finetuned"] == statistics.median(row["test_finetuned_seeds"])
        assert row["macs"] == macs_params(net, small.input_shape)[0]
        assert row["filters"] == {n: m.out_channels for n, m in net.named_modules()
                                  if isinstance(m, nn.Conv2d)}
