"""MTCNN's pretrained ONet (`python -m experiments.rgb`): the loader's key mapping against the
original network's own forward pass, its refusals, MTCNN's pixel scaling, the study's scoring
windows; and, when facenet-pytorch is installed (`make rgb`), the real pretrained weights."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import carprune as cp

from . import main
from . import onet as onet_module
from .onet import ONET_STATS, from_original_state, load_onet

pytestmark = pytest.mark.experiment

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
    with pytest.raises(cp.CarpruneError, match="prelu3.weight"):
        load_onet(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(cp.CarpruneError, match="reinstall facenet-pytorch"):
        load_onet(tmp_path / "junk.pt")


def test_pretrained_without_facenet_names_the_fix(monkeypatch):
    monkeypatch.setattr(onet_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(cp.CarpruneError, match="make rgb"):
        onet_module.pretrained_onet()


def test_onet_stats_are_mtcnns_scaling():
    pixels = torch.tensor([0.0, 127.5, 255.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    torch.testing.assert_close(cp.data.normalise(pixels, *ONET_STATS)[0, :, 0],
                               ((pixels - 127.5) * 0.0078125)[0, :, 0])


def test_scoring_windows_are_labelled_by_the_model_and_at_most_half_faces():
    """A random ONet's decisions label the windows (as a plain forward pass gives them), and the
    draw takes every face it can up to half of the images."""
    model = cp.create_model("onet")
    model.load_state_dict(from_original_state(random_original_state(2)))
    model.eval()
    data, info = main.scoring_images(model, 12, 4, seed=0)
    x, y = data.tensors
    with torch.no_grad():
        assert torch.equal(y, model(x).argmax(1))
    pool_faces, pool = info["pool_faces"], info["pool"]
    assert info["faces"] == int(y.sum()) == min(pool_faces, 6)
    assert info["images"] == len(y) == min(12, pool) and info["non_faces"] == len(y) - info["faces"]
    assert sum(info["images_per_photo"].values()) == len(y)


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

