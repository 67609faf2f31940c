import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import carprune as cp


def spec(name="convnet", **kwargs):
    return {"arch": {"name": name, "kwargs": kwargs}, "input_shape": [1, 28, 28]}


def test_save_load_roundtrip_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = cp.create_model("resnet20", width=4)
    model.carprune_spec = spec("resnet20", width=4)
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.eval().to(memory_format=torch.channels_last)  # the layout carprune computes in
    cp.save(model, tmp_path / "ck")
    loaded = cp.load(tmp_path / "ck")
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert json.loads((tmp_path / "ck" / "model.json").read_text())["arch"]["name"] == "resnet20"


def test_unknown_model_name():
    with pytest.raises(cp.CarpruneError, match="unknown model 'vgg99'.*convnet"):
        cp.create_model("vgg99")


def test_what_cannot_be_saved_is_refused_before_anything_is_written(tmp_path):
    result = cp.PruneResult(cp.create_model("convnet"), {}, 0.9, 0.9, 1.0, "fast")
    with pytest.raises(cp.CarpruneError, match="not a PruneResult.*\\.model"):
        cp.save(result, tmp_path / "a")
    with pytest.raises(cp.CarpruneError, match="no carprune spec"):
        cp.save(result.model, tmp_path / "b")  # built outside carprune.build / load
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_that_does_not_fit(tmp_path):
    model = cp.create_model("convnet")
    model.carprune_spec = spec()
    cp.save(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    meta["arch"]["kwargs"] = {"widths": [16, 64, 64]}
    (tmp_path / "ck" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(cp.CarpruneError, match="not the one these weights were saved with"):
        cp.load(tmp_path / "ck")


def test_edited_weights_and_broken_files(tmp_path):
    model = cp.create_model("convnet")
    model.carprune_spec = spec()
    cp.save(model, tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    state = load_file(weights)
    state["fc2.bias"][0] = float("nan")
    save_file(state, weights)  # edited behind carprune's back (re-signed NaN: test_hostile)
    with pytest.raises(cp.CarpruneError, match="checksum"):
        cp.load(tmp_path / "ck")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(cp.CarpruneError, match="checksum"):
        cp.load(tmp_path / "ck")
    (tmp_path / "ck" / "model.json").write_text("{broken")
    with pytest.raises(cp.CarpruneError, match="not valid JSON"):
        cp.load(tmp_path / "ck")
    with pytest.raises(cp.CarpruneError, match="not a directory"):
        cp.load(tmp_path / "missing")


@pytest.mark.parametrize("name,bar", [("convnet-fmnist", 0.92), ("resnet20-fmnist", 0.91)])
def test_shipped_networks_meet_the_bar(name, bar, fmnist):
    meta = json.loads((cp.io.ZOO_DIR / name / "model.json").read_text())
    assert meta["training"]["command"].startswith("carprune train")
    acc = cp.evaluate(cp.load(name), fmnist.test).accuracy
    assert acc == pytest.approx(meta["training"]["test_accuracy"], abs=1e-9)
    assert acc >= bar
