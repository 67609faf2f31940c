
import pytest
import torch

from carprune.groups import Surgery, Unit

from .conftest import quick_trained


def _check_ablation_equals_removal(model, layer, channels):
    x = torch.randn(16, 1, 28, 28)
    surgery = Surgery(model, x[:1])
    model = surgery.model  # the surgery's own copy
    with torch.no_grad(), surgery.ablated([Unit(layer, c) for c in channels]):
        ablated = model(x)
    restored = model(x)
    surgery.remove(layer, channels)
    removed = model(x)
    assert (ablated - removed).abs().max() < 1e-5
    assert (restored - ablated).abs().max() > 1e-4  # the ablation did something, and was undone
    return surgery


def test_ablation_equals_removal_convnet(fmnist):
    model = quick_trained("convnet", fmnist, n=1000)
    for layer in ("conv1", "conv2", "conv3"):
        _check_ablation_equals_removal(model, layer, [0, 5])


def test_ablation_equals_removal_resnet_plain_and_residual(small_resnet):
    surgery = Surgery(small_resnet, torch.zeros(1, 1, 28, 28))
    assert not surgery.coupled("layer1.0.conv1")
    assert surgery.coupled("layer1.0.conv2")  # the stage's residual channels
    _check_ablation_equals_removal(small_resnet, "layer1.0.conv1", [1])
    s = _check_ablation_equals_removal(small_resnet, "layer2.1.conv2", [0, 3])
    # the residual group went whole: every producer of stage 2 lost the same two channels
    for name in ("layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"):
        assert s.modules[name].out_channels == 14
        assert s.alive[name] == [1, 2] + list(range(4, 16))


def test_unknown_and_non_conv_layers(small_resnet):
    from carprune import CarpruneError

    surgery = Surgery(small_resnet, torch.zeros(1, 1, 28, 28))
    with pytest.raises(CarpruneError, match="no layer 'conv9'.*layer1.0.conv1"):
        surgery.check_layer("conv9")
    with pytest.raises(CarpruneError, match="'bn1' is a BatchNorm2d, not a prunable conv"):
        surgery.check_layer("bn1")
    with pytest.raises(CarpruneError, match="would empty"):
        surgery.remove("conv1", list(range(8)))
