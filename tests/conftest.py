from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import carprune as cp
from carprune import cli


@pytest.fixture(scope="session")
def fmnist() -> cp.data.Data:
    return cp.data.fashion_mnist()


@pytest.fixture(scope="session")
def baseline() -> nn.Module:
    return cp.load("convnet-fmnist")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _python_warning_filters() -> None:
    """The warning filters of a plain `python` run (what pytest set is put aside)."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                     ResourceWarning):
        warnings.simplefilter("ignore", category, append=True)
    warnings.simplefilter("default", append=True)
    warnings.showwarning = _show_warning


def _forget_modules(names: set[str], folder: Path) -> None:
    """Unload the modules of `names` read from `folder`, so that another test's folder can hold
    a module of the same name."""
    for name in names:
        file = getattr(sys.modules[name], "__file__", None)
        if file and Path(file).is_relative_to(folder):
            del sys.modules[name]


@pytest.fixture
def carprune_cli(capsys, monkeypatch):
    """`carprune ARGS` run in this process instead of `python -m carprune ARGS`, without its
    seconds of imports: a CompletedProcess with the exit status (cli.main's SystemExit),
    stdout and stderr (warnings shown as the command shows them). `path`: a folder the run
    imports factories from (PYTHONPATH); its modules are forgotten afterwards. What cli.main
    sets for the whole process (torch's threads and deterministic algorithms, the warning
    format) and the random state are put back when the test ends."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), warnings.formatwarning,
             torch.random.get_rng_state())

    def run(*args, path: Path | None = None) -> subprocess.CompletedProcess:
        if path is not None:
            monkeypatch.syspath_prepend(str(path))
        before = set(sys.modules)
        capsys.readouterr()
        with warnings.catch_warnings():
            _python_warning_filters()
            try:
                cli.main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code or 0
        out, err = capsys.readouterr()
        if path is not None:
            _forget_modules(set(sys.modules) - before, Path(path))
        return subprocess.CompletedProcess(["carprune", *args], code, out, err)

    yield run
    threads, deterministic, warn_only, formatwarning, rng = saved
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    warnings.formatwarning = formatwarning
    torch.random.set_rng_state(rng)


def subset(ds: TensorDataset, n: int, start: int = 0) -> TensorDataset:
    return TensorDataset(*[t[start:start + n] for t in ds.tensors])


def small_fashion_mnist() -> cp.data.Data:
    """A thousand images a split, for the commands the tests start as processes (`--data
    SMALL_DATA`): they measure accuracies on them in a fraction of the full set's time."""
    data = cp.data.fashion_mnist()
    return dataclasses.replace(data, name="fashion-mnist-small",
                               **{s: subset(getattr(data, s), 1000)
                                  for s in ("train", "val", "test")})


SMALL_DATA = "tests.conftest:small_fashion_mnist"


def quick_trained(name: str, data: cp.data.Data, n: int = 3000, **kwargs) -> nn.Module:
    """A zoo model trained for one short epoch: far from good, but its filters differ."""
    model = cp.create_model(name, **kwargs)
    cp.fit(model, subset(data.train, n), 1, cp.Recipe(lr=0.05), progress=False)
    model.carprune_spec = {"arch": {"name": name, "kwargs": kwargs}, "input_shape": [1, 28, 28]}
    return model.eval()


@pytest.fixture(scope="session")
def small_resnet(fmnist) -> nn.Module:
    return quick_trained("resnet20", fmnist, width=8)


class ConcatNet(nn.Module):
    """Two branches concatenated, then a conv and a classifier: exercises index mapping."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.left = nn.Conv2d(8, 6, 3, padding=1)
        self.right = nn.Conv2d(8, 10, 1)
        self.mix = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        x = self.pool(torch.relu(self.mix(x)))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="session")
def concat_net(fmnist) -> nn.Module:
    torch.manual_seed(1)
    model = ConcatNet()
    cp.fit(model, subset(fmnist.train, 3000), 1, cp.Recipe(lr=0.05), progress=False)
    return model.eval()


def hand_made_net(readout=(2.0, 1.0, 0.1), threshold=1.0) -> nn.Module:
    """1x1 'images' x; conv1 has filters h_i = relu(x); logit1 = sum_i a_i h_i, logit0 = c.

    With every label 1, an image is right iff sum of the kept a_i times x exceeds c, so the CAR
    index of every filter is a matter of arithmetic (see test_prune.py).
    """
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, len(readout), 1)), ("relu", nn.ReLU()),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(len(readout), 2))]))
    with torch.no_grad():
        net.conv1.weight.fill_(1.0)
        net.conv1.bias.zero_()
        net.fc.weight.zero_()
        net.fc.weight[1] = torch.tensor(readout)
        net.fc.bias.copy_(torch.tensor([threshold, 0.0]))
    return net.eval()


def hand_made_data(xs=(0.4, 0.6, 1.2)) -> TensorDataset:
    x = torch.tensor(xs).view(-1, 1, 1, 1)
    return TensorDataset(x, torch.ones(len(xs), dtype=torch.int64))
