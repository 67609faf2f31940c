"""MTCNN's ONet as a zoo model (shape, pruning through Surgery) and the photographs that ship
inside packages. Its pretrained weights are the study's: experiments/rgb/test_rgb.py."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import carprune as cp


def random_onet(seed: int = 0) -> torch.nn.Module:
    """The zoo ONet with random weights, PReLU slopes included (each channel its own)."""
    model = cp.create_model("onet")
    g = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: torch.randn(v.shape, generator=g) *
                           (0.25 if k.startswith("prelu") else 0.1)
                           for k, v in model.state_dict().items()})
    return model.eval()


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def test_onet_is_a_zoo_model_with_two_logits():
    assert "onet" in cp.models.list_models()
    model = cp.create_model("onet").eval()
    with torch.no_grad():
        assert model(images(5)).shape == (5, 2)
    assert model.conv1.out_channels == 32 and model.prelu1.num_parameters == 32


@pytest.mark.parametrize("layer,channel", [("conv1", 5), ("conv4", 77)])
def test_surgery_removes_the_prelu_channel_and_equals_ablation(layer, channel):
    model = random_onet(2)
    x = images(6, 2)
    slopes = getattr(model, layer.replace("conv", "prelu")).weight.detach().clone()
    ablated = copy.deepcopy(model)
    with torch.no_grad():
        getattr(ablated, layer).weight[channel] = 0
        getattr(ablated, layer).bias[channel] = 0
        expected = ablated(x)
    surgery = cp.Surgery(model, x[:1])
    assert surgery.remove(layer, [channel]) == [channel]
    pruned = surgery.model
    conv, prelu = getattr(pruned, layer), getattr(pruned, layer.replace("conv", "prelu"))
    assert conv.out_channels == 31 if layer == "conv1" else conv.out_channels == 127
    assert prelu.num_parameters == conv.out_channels
    keep = [c for c in range(len(slopes)) if c != channel]
    torch.testing.assert_close(prelu.weight.detach(), slopes[keep])
    if layer == "conv1":
        assert pruned.conv2.in_channels == 31
    else:  # dense5 loses the 9 columns of the channel: the flatten is (channel, h, w)
        assert pruned.dense5.in_features == 127 * 9
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-5)


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
