"""Hostile and broken inputs: every mutation gets a clean error, never a traceback or a wrong
model (a checkpoint either fails to load or loads the very same network)."""

import gzip
import hashlib
import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save as tensors_to_bytes

import carprune as cp
from carprune import io
from carprune.scoring import ScoringSet

from .test_data import idx_bytes

X = torch.randn(4, 1, 28, 28)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "convnet"
    shutil.copytree(io.ZOO_DIR / "convnet-fmnist", path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    return cp.load(checkpoint)(X)


def load_or_error(path, reference):
    try:
        model = cp.load(path)
    except cp.CarpruneError as exc:
        assert "\n" not in str(exc)
        return "error"
    assert torch.equal(model(X), reference), "a damaged checkpoint loaded as a different model"
    return "same"


def test_fuzzed_checkpoints(checkpoint, reference, tmp_path):
    rng = random.Random(0)
    outcomes = []
    for trial in range(60):
        case = tmp_path / f"case{trial}"
        shutil.copytree(checkpoint, case)
        target = case / rng.choice(["model.safetensors", "model.json"])
        data = bytearray(target.read_bytes())
        kind = rng.choice(["truncate", "flip", "flip-header"])
        if kind == "truncate":
            data = data[:rng.randrange(len(data))]
        else:
            span = 200 if kind == "flip-header" else len(data)
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(min(span, len(data)))
                data[pos] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        outcomes.append(load_or_error(case, reference))
    assert outcomes.count("error") >= 50  # only edits to the training log may load (unchanged)


def resign(case, state):
    """Write weights with consistent checksums: only the shape/dtype checks can catch them."""
    spec = json.loads((case / "model.json").read_text())
    blob = tensors_to_bytes(state, metadata={"architecture_sha256": io._architecture_sha(spec)})
    spec["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    (case / "model.safetensors").write_bytes(blob)
    (case / "model.json").write_text(json.dumps(spec))


@pytest.mark.parametrize("mutate, words", [
    (lambda s: {**s, "conv2.weight": s["conv2.weight"][:32]}, "has shape"),
    (lambda s: {**s, "fc2.bias": s["fc2.bias"].double()}, "dtype"),
    (lambda s: {k: v for k, v in s.items() if k != "bn1.running_var"}, "missing"),
    (lambda s: {**s, "extra.weight": torch.zeros(2)}, "unexpected"),
    (lambda s: {**s, "conv1.weight": s["conv1.weight"] * float("inf")}, "NaN or inf"),
])
def test_consistently_written_but_wrong_weights(checkpoint, tmp_path, mutate, words):
    case = tmp_path / "case"
    shutil.copytree(checkpoint, case)
    state = {k: v.contiguous().clone() for k, v in cp.load(checkpoint).state_dict().items()}
    resign(case, mutate(state))
    with pytest.raises(cp.CarpruneError, match=words):
        cp.load(case)


def test_architecture_that_does_not_match_the_weights(checkpoint, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(checkpoint, case)
    spec = json.loads((case / "model.json").read_text())
    spec["arch"]["kwargs"]["hidden"] = 128
    (case / "model.json").write_text(json.dumps(spec))
    with pytest.raises(cp.CarpruneError, match="not the one these weights were saved with"):
        cp.load(case)


def test_pickle_refused_unless_trusted(checkpoint, tmp_path):
    state = cp.load(checkpoint).state_dict()
    torch.save(state, tmp_path / "weights.pt")
    with pytest.raises(cp.CarpruneError, match="pickle.*--trust-pickle"):
        io.read_weights(tmp_path / "weights.pt")
    trusted = io.read_weights(tmp_path / "weights.pt", trust_pickle=True)
    assert all(torch.equal(trusted[k], v) for k, v in state.items())
    case = tmp_path / "case"
    shutil.copytree(checkpoint, case)
    shutil.copy(tmp_path / "weights.pt", case / "model.safetensors")
    with pytest.raises(cp.CarpruneError, match="pickle"):
        cp.load(case)


def write_tiny_idx(root, images, labels, test_images, test_labels):
    root.mkdir(parents=True, exist_ok=True)
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(test_images)))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(test_labels)))


def test_fuzzed_data_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 10)
    good = tmp_path / "good"
    write_tiny_idx(good, images, labels, images[:20], labels[:20])
    assert len(cp.data.mnist(good, val_per_class=2).train) == 80
    pyrng = random.Random(1)
    errors = 0
    for trial in range(40):
        case = tmp_path / f"case{trial}"
        shutil.copytree(good, case)
        target = case / pyrng.choice(sorted(p.name for p in good.iterdir()))
        raw = bytearray(gzip.decompress(target.read_bytes()))
        kind = pyrng.choice(["truncate", "header", "gzip"])
        if kind == "truncate":
            raw = raw[:pyrng.randrange(len(raw))]
            target.write_bytes(gzip.compress(bytes(raw)))
        elif kind == "header":
            raw[pyrng.randrange(4 + 4 * raw[3])] ^= 1 << pyrng.randrange(8)  # header only
            target.write_bytes(gzip.compress(bytes(raw)))
        else:
            blob = bytearray(target.read_bytes())
            blob[pyrng.randrange(10, len(blob))] ^= 0xFF
            target.write_bytes(bytes(blob))
        try:
            data = cp.data.mnist(case, val_per_class=2)
        except cp.CarpruneError as exc:
            assert "\n" not in str(exc)
            errors += 1
            continue
        # a header flip that still describes the same bytes must give the same data
        assert torch.equal(data.train.tensors[0], cp.data.mnist(good, val_per_class=2)
                           .train.tensors[0])
    assert errors >= 30


def test_labels_outside_the_class_range(tmp_path):
    images = np.zeros((100, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 10)
    labels[3] = 12
    write_tiny_idx(tmp_path, images, labels, images[:20], labels[:20] % 10)
    with pytest.raises(cp.CarpruneError, match="outside 0..9"):
        cp.data.mnist(tmp_path, val_per_class=2)


def test_nan_in_scoring_data_and_one_class_warning(baseline):
    x = torch.zeros(8, 1, 28, 28)
    x[3, 0, 5, 5] = float("nan")
    with pytest.raises(cp.CarpruneError, match="NaN"):
        ScoringSet.from_any(torch.utils.data.TensorDataset(x, torch.zeros(8, dtype=torch.long)))
    one_class = torch.utils.data.TensorDataset(torch.randn(8, 1, 28, 28),
                                               torch.zeros(8, dtype=torch.long))
    with pytest.warns(UserWarning, match="single class"):
        cp.car_prune(baseline, one_class, ["conv3"], keep=63, progress=False)


def test_memory_budget_checked_before_starting(baseline, fmnist):
    from .conftest import subset
    with pytest.raises(cp.CarpruneError, match="over the memory budget.*--score-samples"):
        cp.car_prune(baseline, subset(fmnist.val, 500), ["conv1"], keep=0.5,
                     engine=cp.EngineOptions(memory_budget=10 * 2**20), progress=False)


def test_cli_damaged_checkpoint_one_line_exit_2(checkpoint, tmp_path, carprune_cli):
    case = tmp_path / "case"
    shutil.copytree(checkpoint, case)
    blob = bytearray((case / "model.safetensors").read_bytes())
    blob[-10] ^= 0x40
    (case / "model.safetensors").write_bytes(bytes(blob))
    proc = carprune_cli("evaluate", str(case))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "checksum" in proc.stderr
