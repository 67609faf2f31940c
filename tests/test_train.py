import torch

import carprune as cp
from carprune.train import augment

from .conftest import subset


def test_short_training_lowers_the_loss(fmnist):
    torch.manual_seed(0)
    model = cp.create_model("convnet", widths=(8, 16, 16), hidden=32)
    data = subset(fmnist.train, 2048)
    before = cp.evaluate(model, data).loss
    log = cp.fit(model, data, epochs=3, lr=0.05, progress=False)
    after = cp.evaluate(model, data).loss
    assert after < 0.75 * before
    assert log[1]["train_loss"] < log[0]["train_loss"]


def test_augment_translates_and_flips_only():
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    out = augment(x, torch.Generator().manual_seed(0), pad=0)
    for i in range(2):  # with no padding, only flips are possible
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    out = augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape


def test_runs_of_a_few_steps_train(fmnist):
    """1 to 8 optimizer steps (OneCycleLR divided by zero at four): one epoch logged, and
    every weight tensor moved."""
    for steps in range(1, 9):
        torch.manual_seed(0)
        model = cp.create_model("convnet", widths=(8, 16, 16), hidden=32)
        before = [p.detach().clone() for p in model.parameters() if p.ndim > 1]
        log = cp.fit(model, subset(fmnist.train, 128 * steps), epochs=1, batch_size=128,
                     lr=0.05, progress=False)
        after = [p.detach() for p in model.parameters() if p.ndim > 1]
        assert len(log) == 1
        assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
