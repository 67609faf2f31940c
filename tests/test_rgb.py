"""MTCNN's ONet as a zoo model: shape, pruning through Surgery, the loader's key mapping, package
photos; and, when facenet-pytorch is installed (`make rgb`), the real pretrained weights."""

import copy
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import carprune as cp
from carprune.errors import CarpruneError
from carprune.groups import Surgery
from carprune.models import onet as onet_module
from carprune.models.onet import ONET_STATS, from_original_state, load_onet, onet

# facenet-pytorch's ONet state dict layout: name -> shape, heads included
ORIGINAL_SHAPES = {
    "conv1.weight": (32, 3, 3, 3), "conv1.bias": (32,), "prelu1.weight": (32,),
    "conv2.weight": (64, 32, 3, 3), "conv2.bias": (64,), "prelu2.weight": (64,),
    "conv3.weight": (64, 64, 3, 3), "conv3.bias": (64,), "prelu3.weight": (64,),
    "conv4.weight": (128, 64, 2, 2), "conv4.bias": (128,), "prelu4.weight": (128,),
    "dense5.weight": (256, 1152), "dense5.bias": (256,), "prelu5.weight": (256,),
    "dense6_1.weight": (2, 256), "dense6_1.bias": (2,),
    "dense6_2.weight": (4, 256), "dense6_2.bias": (4,),
    "dense6_3.weight": (10, 256), "dense6_3.bias": (10,),
}


def random_original_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * (0.25 if k.startswith("prelu") else 0.1)
            for k, shape in ORIGINAL_SHAPES.items()}


def original_forward(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ONet's face probabilities as the original computes them: conv4's output is flattened
    after permute(0, 3, 2, 1) (width, height, channel order), then a softmax."""
    for i, pool in ((1, (3, 2)), (2, (3, 2)), (3, (2, 2)), (4, None)):
        x = F.prelu(F.conv2d(x, s[f"conv{i}.weight"], s[f"conv{i}.bias"]), s[f"prelu{i}.weight"])
        if pool:
            x = F.max_pool2d(x, pool[0], pool[1], ceil_mode=True)
    x = x.permute(0, 3, 2, 1).contiguous().flatten(1)
    x = F.prelu(F.linear(x, s["dense5.weight"], s["dense5.bias"]), s["prelu5.weight"])
    return F.linear(x, s["dense6_1.weight"], s["dense6_1.bias"]).softmax(1)


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def random_onet(seed: int = 0) -> torch.nn.Module:
    model = onet()
    model.load_state_dict(from_original_state(random_original_state(seed)))
    return model.eval()


def test_onet_is_a_zoo_model_with_two_logits():
    assert "onet" in cp.models.list_models()
    model = cp.create_model("onet").eval()
    with torch.no_grad():
        assert model(images(5)).shape == (5, 2)
    assert model.conv1.out_channels == 32 and model.prelu1.num_parameters == 32


def test_state_dict_round_trip_equals_the_original_layout(tmp_path):
    state = random_original_state(1)
    path = tmp_path / "onet.pt"
    torch.save(state, path)
    model = load_onet(path)
    x = images(16, 1)
    with torch.no_grad():
        ours = model(x).softmax(1)
    torch.testing.assert_close(ours, original_forward(state, x), rtol=1e-5, atol=1e-6)
    assert set(model.state_dict()) == {k for k in ORIGINAL_SHAPES
                                       if not k.startswith(("dense6_2", "dense6_3"))}
    assert model.carprune_spec["arch"] == {"name": "onet", "kwargs": {}}
    # the original dict is left as it was
    assert state["dense5.weight"].shape == (256, 1152)


def test_loader_refuses_what_is_not_onet(tmp_path):
    state = random_original_state()
    del state["prelu3.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(CarpruneError, match="prelu3.weight"):
        load_onet(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(CarpruneError, match="reinstall facenet-pytorch"):
        load_onet(tmp_path / "junk.pt")


def test_pretrained_without_facenet_names_the_fix(monkeypatch):
    monkeypatch.setattr(onet_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CarpruneError, match="make rgb"):
        onet_module.pretrained_onet()


@pytest.mark.parametrize("layer,channel", [("conv1", 5), ("conv4", 77)])
def test_surgery_removes_the_prelu_channel_and_equals_ablation(layer, channel):
    model = random_onet(2)
    x = images(6, 2)
    prelu = getattr(model, layer.replace("conv", "prelu"))
    slopes = prelu.weight.detach().clone()
    ablated = copy.deepcopy(model)
    with torch.no_grad():
        getattr(ablated, layer).weight[channel] = 0
        getattr(ablated, layer).bias[channel] = 0
        expected = ablated(x)
    surgery = Surgery(model, x[:1])
    assert surgery.remove(layer, [channel]) == [channel]
    conv = getattr(model, layer)
    assert conv.out_channels == 31 if layer == "conv1" else conv.out_channels == 127
    assert prelu.num_parameters == conv.out_channels
    keep = [c for c in range(len(slopes)) if c != channel]
    torch.testing.assert_close(prelu.weight.detach(), slopes[keep])
    if layer == "conv1":
        assert model.conv2.in_channels == 31
    else:  # dense5 loses the 9 columns of the channel: the flatten is (channel, h, w)
        assert model.dense5.in_features == 127 * 9
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_package_photos_and_windows_are_reproducible():
    photos = cp.data.package_photos()
    assert "grace_hopper" in photos  # matplotlib, a dependency, ships it
    photo = photos["grace_hopper"]
    assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
    small = {"grace_hopper": photo}
    a, origin = cp.data.photo_windows(small, 5, seed=3)
    b, _ = cp.data.photo_windows(small, 5, seed=3)
    assert a.shape == (10, 3, 48, 48) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 255
    torch.testing.assert_close(a[1::2], a[0::2].flip(3))
    assert [o["mirrored"] for o in origin[:2]] == [False, True]
    first = origin[0]
    window = torch.tensor(photo[first["y"]:first["y"] + first["side"],
                                first["x"]:first["x"] + first["side"]]).permute(2, 0, 1)
    torch.testing.assert_close(a[0], F.interpolate(window[None].float(), size=(48, 48),
                                                   mode="area")[0])
    assert not torch.equal(a, cp.data.photo_windows(small, 5, seed=4)[0])


def test_onet_stats_are_mtcnns_scaling():
    pixels = torch.tensor([0.0, 127.5, 255.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    torch.testing.assert_close(cp.data.normalise(pixels, *ONET_STATS)[0, :, 0],
                               ((pixels - 127.5) * 0.0078125)[0, :, 0])


def crop(photo: np.ndarray, y: int, x: int, side: int) -> torch.Tensor:
    window = torch.tensor(photo[y:y + side, x:x + side]).permute(2, 0, 1)[None].float()
    return cp.data.normalise(F.interpolate(window, size=(48, 48), mode="area"), *ONET_STATS)


@pytest.mark.skipif(importlib.util.find_spec("facenet_pytorch") is None,
                    reason="facenet-pytorch is not installed (make rgb)")
def test_pretrained_onet_finds_grace_hoppers_face():
    import sys

    model = onet_module.pretrained_onet()
    assert "facenet_pytorch" not in sys.modules  # found, never imported
    photo = cp.data.package_photos()["grace_hopper"]
    with torch.no_grad():
        face = model(crop(photo, 160, 160, 200)).softmax(1)[0, 1]
        corner = model(crop(photo, 0, 0, 200)).softmax(1)[0, 1]
    assert face > 0.99 and corner < 0.05
