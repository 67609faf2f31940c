"""Weight pruning, sharing, Huffman coding, the .carz file and its size accounting, export."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import carprune as cp
from carprune.compress import (
    code_lengths,
    compress_run,
    export_onnx,
    kmeans_1d,
    load_carz,
    prune_weights,
    record_sizes,
    write_carz,
)
from carprune.compress.carz import _encode_entries, coded_breakdown, decode_weight, encode_weight
from carprune.compress.huffman import BitReader, BitWriter, canonical_codes
from carprune.compress.kmeans import freeze_, quantize_
from carprune.compress.pipeline import make_permanent, sparsity_schedule, weight_layers
from carprune.groups import Surgery

from .conftest import subset


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        value |= (data[pos] & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not data[pos - 1] & 0x80:
            return value, pos


def parse_carz(path) -> tuple[dict, list[int]]:
    """An independent reading of the documented layout: header, then each record's size."""
    data = Path(path).read_bytes()
    magic, version, crc, length = struct.unpack_from("<4sBIQ", data)
    assert (magic, version, length) == (b"CARZ", 1, len(data) - 17)
    assert zlib.crc32(data[17:]) == crc
    size, pos = read_varint(data, 17)
    header = json.loads(zlib.decompress(data[pos:pos + size]))
    pos += size
    sizes = []
    while pos < len(data):
        size, body = read_varint(data, pos)
        sizes.append(body + size - pos)
        pos = body + size
    assert pos == len(data)
    return header, sizes


# -- k-means and weight sharing -------------------------------------------------------------

def test_kmeans_recovers_known_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([-1.0, 0.5, 2.0])
    truth = rng.integers(0, 3, 600)
    values = centres[truth] + rng.normal(0, 0.05, 600)
    centroids, labels = kmeans_1d(values, 3)
    order = np.argsort(centroids)
    means = [values[truth == c].mean() for c in range(3)]
    np.testing.assert_allclose(centroids[order], means, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.argsort(order)[labels], truth)


def test_kmeans_drops_empty_clusters_and_starts_linear():
    centroids, labels = kmeans_1d(np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 4)
    np.testing.assert_array_equal(centroids, [0.0, 1.0])   # 1/3 and 2/3 never get members
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])


def test_centroid_gradient_is_sum_of_member_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.1] = 0
    k = quantize_(layer, 2)
    assert 1 <= k <= 4
    plain = layer.weight.detach().clone().requires_grad_()
    x = torch.randn(5, 6)
    (layer(x) ** 2).sum().backward()
    (nn.functional.linear(x, plain, layer.bias) ** 2).sum().backward()
    index = layer.parametrizations.weight[0].index
    expected = torch.stack([plain.grad[index == c].sum() for c in range(1, k + 1)])
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, expected)
    freeze_(layer)
    assert isinstance(layer.weight, nn.Parameter) and not hasattr(layer, "parametrizations")
    assert (layer.weight[index == 0] == 0).all()


def test_magnitude_pruning_keeps_the_largest_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    before = {n: m.weight.detach().clone() for n, m in weight_layers(model).items()}
    prune_weights(model, 0.75, layer_sparsity={"0": 0.5})
    make_permanent(model)
    for name, amount in (("0", 0.5), ("2", 0.75)):
        w, original = dict(model.named_modules())[name].weight, before[name].flatten()
        kept = original.abs().sort(descending=True).indices[:original.numel() - round(
            amount * original.numel())]
        expected = torch.zeros_like(original)
        expected[kept] = original[kept]
        assert torch.equal(w.detach().flatten(), expected)
    with pytest.raises(cp.CarpruneError, match="not a conv or linear layer"):
        prune_weights(model, 0.5, layer_sparsity={"1": 0.5})


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruning_in_rounds_reaches_the_sparsity_and_keeps_earlier_masks(scope):
    """Zhu & Gupta's cubic ramp: 1 - (1 - r/3)**3 = 19/27, 26/27, 1 of the way after each of 3
    rounds. Untrained between rounds, the rounds mask what one shot masks; with the weights
    moved in between (as training would), what a round masked stays masked."""
    assert sparsity_schedule(3) == pytest.approx([19 / 27, 26 / 27, 1.0])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    one_shot, moved = copy.deepcopy(model), copy.deepcopy(model)
    prune_weights(one_shot, 0.8, scope)
    for fraction in sparsity_schedule(3):
        prune_weights(model, 0.8, scope, fraction=fraction)
        before = {n: m.weight_mask.clone() for n, m in weight_layers(moved).items()
                  if hasattr(m, "weight_mask")}
        prune_weights(moved, 0.8, scope, fraction=fraction)
        for name, m in weight_layers(moved).items():
            if name in before:
                assert (m.weight_mask <= before[name]).all()
            with torch.no_grad():
                m.weight_orig.copy_(torch.randn_like(m.weight_orig))
    layers = [weight_layers(m) for m in (model, one_shot, moved)]
    for name in layers[0]:
        assert torch.equal(layers[0][name].weight_mask, layers[1][name].weight_mask)
    zeros = [sum(int((m.weight_mask == 0).sum()) for m in ls.values()) for ls in layers]
    if scope == "layer":
        assert zeros == [round(0.8 * 36) + round(0.8 * 8112)] * 3
    else:
        assert zeros == [round(0.8 * (36 + 8112))] * 3


# -- Huffman coding ---------------------------------------------------------------------------

def test_huffman_code_lengths_match_hand_computation():
    # CLRS 16.3: merge f+e=14, c+b=25, 14+d=30, 25+30=55, a+55=100
    lengths = code_lengths([45, 13, 12, 16, 9, 5])
    assert lengths == [1, 3, 3, 3, 4, 4]
    assert code_lengths([0, 7, 0]) == [0, 1, 0]
    assert canonical_codes(lengths) == {0: "0", 1: "100", 2: "101", 3: "110", 4: "1110",
                                        5: "1111"}


def test_huffman_decoding_inverts_encoding():
    rng = np.random.default_rng(1)
    symbols = rng.geometric(0.3, 5000) - 1
    symbols = np.minimum(symbols, 20)
    lengths = code_lengths(np.bincount(symbols, minlength=21))
    w = BitWriter()
    w.gamma(len(symbols))
    w.table(lengths)
    w.symbols(symbols, lengths)
    data = w.getvalue()
    p = np.bincount(symbols) / len(symbols)
    entropy = -float((p[p > 0] * np.log2(p[p > 0])).sum())
    assert len(data) * 8 < (entropy + 1) * len(symbols) + 200    # Huffman: < H + 1 bits each
    r = BitReader(data)
    assert r.gamma() == len(symbols)
    assert r.table(21) == lengths
    np.testing.assert_array_equal(r.symbols(len(symbols), lengths), symbols)
    with pytest.raises(EOFError):
        BitReader(data[:10]).symbols(len(symbols), lengths)


def test_sparse_coding_with_filler_zeros_round_trips():
    w = torch.zeros(3000)
    w[[0, 5, 6, 700, 2999]] = torch.tensor([0.5, -0.25, 1.0, 0.5, -2.0])
    codebook = np.array([-2.0, -0.25, 0.5, 1.0], np.float16)
    symbols = np.array([2, 1, 3, 2, 0]) + 1
    gaps = np.diff(np.array([0, 5, 6, 700, 2999]), prepend=-1) - 1
    for g in range(1, 9):           # g = 1: runs of 693 and 2298 zeros need ~1500 fillers
        payload = _encode_entries(codebook, symbols, gaps, g)
        assert torch.equal(decode_weight(payload, w.shape), w)
    assert len(encode_weight(w)) <= min(len(_encode_entries(codebook, symbols, gaps, g))
                                        for g in range(1, 9))
    assert torch.equal(decode_weight(encode_weight(torch.zeros(2, 3)), torch.Size([2, 3])),
                       torch.zeros(2, 3))


# -- the .carz file ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantised(baseline) -> nn.Module:
    model = copy.deepcopy(baseline)
    prune_weights(model, 0.7)
    make_permanent(model)
    for module in weight_layers(model).values():
        quantize_(module, 5)
        freeze_(module)
    return model.eval()


@pytest.fixture(scope="module")
def carz_path(quantised, tmp_path_factory):
    path = tmp_path_factory.mktemp("carz") / "model.carz"
    write_carz(path, quantised, [f"{n}.weight" for n in weight_layers(quantised)])
    return path


def test_carz_round_trips_bit_exactly(quantised, carz_path, fmnist):
    loaded = load_carz(carz_path)
    for key, tensor in quantised.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    x = fmnist.test.tensors[0][:64]
    with torch.inference_mode():
        assert torch.equal(loaded(x), quantised(x))
    assert loaded.carprune_spec["arch"] == quantised.carprune_spec["arch"]


def test_carz_record_sizes_are_the_file(quantised, carz_path):
    header, sizes = parse_carz(carz_path)
    assert header["tensors"] == list(quantised.state_dict())
    assert record_sizes(carz_path) == dict(zip(header["tensors"], sizes, strict=True))
    fc1 = quantised.fc1.weight
    # 30% of the weights kept, each about 7 bits with its gap: 15x
    assert sizes[header["tensors"].index("fc1.weight")] < fc1.numel() * 4 / 12
    assert 17 + sum(sizes) < os.path.getsize(carz_path) < 17 + sum(sizes) + 2000
    parts = coded_breakdown(carz_path)
    assert set(parts) == {f"{n}.weight" for n in weight_layers(quantised)}
    for name, p in parts.items():
        assert sum(p.values()) == record_sizes(carz_path)[name]
        k = len(quantised.state_dict()[name].unique()) - 1   # nonzero shared values
        assert p["codebook"] == (8 + 16 * k) / 8
        assert 0 <= p["padding"] < 1


def test_carz_refuses_unquantised_weights(baseline, tmp_path):
    with pytest.raises(cp.CarpruneError, match="quantise it"):
        write_carz(tmp_path / "m.carz", baseline, ["conv1.weight"])
    assert not (tmp_path / "m.carz").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "empty"])
def test_damaged_carz_gets_a_clean_error(carz_path, tmp_path, damage):
    data = bytearray(carz_path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "truncate":
        data = data[:len(data) - 100]
    elif damage == "magic":
        data[:4] = b"PK\x03\x04"
    else:
        data = bytearray()
    bad = tmp_path / "bad.carz"
    bad.write_bytes(bytes(data))
    expected = {"flip": "damaged", "truncate": "truncated", "magic": "not a .carz",
                "empty": "not a .carz"}[damage]
    with pytest.raises(cp.CarpruneError, match=expected) as info:
        load_carz(bad)
    assert str(info.value).count(";") == 1          # one sentence: the problem; the fix
    with pytest.raises(cp.CarpruneError):
        record_sizes(bad)


# -- the whole run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(baseline, tmp_path_factory):
    """A filter-pruned checkpoint written as `carprune prune` does (every other filter of conv1
    and conv2 removed), with the result.json that names its unpruned baseline."""
    surgery = Surgery(baseline, torch.zeros(1, 1, 28, 28))
    model = surgery.model
    surgery.remove("conv1", list(range(0, 32, 2)))
    surgery.remove("conv2", list(range(0, 64, 2)))
    model.carprune_spec = dict(model.carprune_spec, pruning_history=surgery.history())
    run = tmp_path_factory.mktemp("run")
    cp.save(model, run)
    cp.io.write_json(run / "result.json", {"checkpoint": "convnet-fmnist"})
    return run


def test_compress_run_sizes_come_from_the_file(run_dir, baseline, fmnist, tmp_path, capsys):
    data = dataclasses.replace(fmnist, train=subset(fmnist.train, 2000),
                               test=subset(fmnist.test, 1000))
    out = tmp_path / "out"
    report = compress_run(run_dir, data, out, weight_sparsity=0.7, bits=5, finetune_epochs=1,
                          prune_rounds=2, progress=False)
    assert json.loads((out / "sizes.json").read_text()) == report
    assert set(report) == {"layers", "total", "accuracy"}
    assert set(report["accuracy"]) == {"baseline", "car", "pruned", "quantized", "final"}
    stages = {"original", "car", "pruned", "quantized", "coded"}
    header, sizes = parse_carz(out / "model.carz")
    records = dict(zip(header["tensors"], sizes, strict=True))
    pruned = cp.load(run_dir)
    for name in ("conv1", "conv2", "conv3", "fc1", "fc2"):
        entry = report["layers"][name]
        assert set(entry) == {"bytes", "factor", "coded_parts"}
        assert set(entry["bytes"]) == stages
        assert entry["bytes"]["coded"] == records[f"{name}.weight"]
        assert sum(entry["coded_parts"].values()) == entry["bytes"]["coded"]
        assert entry["bytes"]["original"] == 4 * getattr(baseline, name).weight.numel()
        assert entry["bytes"]["car"] == 4 * getattr(pruned, name).weight.numel()
        assert entry["factor"] == entry["bytes"]["original"] / entry["bytes"]["coded"]
    assert report["layers"]["conv1"]["bytes"]["car"] == 16 * 9 * 4
    total = report["total"]["bytes"]
    assert total["coded"] == os.path.getsize(out / "model.carz")
    assert total["original"] == sum(t.numel() * t.element_size()
                                    for t in baseline.state_dict().values())
    assert report["accuracy"]["baseline"] == cp.evaluate(baseline, data.test).accuracy
    assert report["accuracy"]["car"] == cp.evaluate(pruned, data.test).accuracy
    final = load_carz(out / "model.carz")
    assert report["accuracy"]["final"] == cp.evaluate(final, data.test).accuracy
    for name, module in weight_layers(final).items():
        w = module.weight
        assert int((w == 0).sum()) >= round(0.7 * w.numel()), name
        assert len(torch.unique(w[w != 0])) <= 32, name
    assert "factor" in capsys.readouterr().out
    with pytest.raises(cp.CarpruneError, match="already exists"):
        compress_run(run_dir, data, out, progress=False)


def test_compress_run_refuses_bad_settings(run_dir, fmnist, tmp_path):
    with pytest.raises(cp.CarpruneError, match="weight sparsity"):
        compress_run(run_dir, fmnist, tmp_path / "a", weight_sparsity=1.0)
    with pytest.raises(cp.CarpruneError, match="bits of conv1"):
        compress_run(run_dir, fmnist, tmp_path / "b", bits=9)
    with pytest.raises(cp.CarpruneError, match="--prune-rounds must be"):
        compress_run(run_dir, fmnist, tmp_path / "c", prune_rounds=0)
    assert not any((tmp_path / d).exists() for d in "abc")


# -- export ------------------------------------------------------------------------------------

def test_onnx_export_matches_pytorch(carz_path, tmp_path, monkeypatch):
    for package in ("onnxruntime", "onnxscript", "onnx"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install 'carprune[onnx]')")
    import onnxruntime

    model = load_carz(carz_path)
    path = tmp_path / "model.onnx"
    diff = export_onnx(model, path, (1, 28, 28))
    assert diff is not None and diff < 1e-4
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = model(x).numpy()
    assert np.abs(session.run(None, {"images": x.numpy()})[0] - expected).max() < 1e-4
    monkeypatch.setitem(sys.modules, "onnxruntime", None)       # as if not installed
    with pytest.warns(UserWarning, match="onnxruntime is not installed"):
        assert export_onnx(model, tmp_path / "unchecked.onnx", (1, 28, 28)) is None
    assert (tmp_path / "unchecked.onnx").read_bytes() == path.read_bytes()
