"""The networks users bring, torchvision's and timm's, at 64 px: Torch-Pruning's groups, the
fast engine's tallies against the naive engine's, and pruned models that reload without pickle
and compute the same outputs."""


import pytest
import torch
from torch.utils.data import TensorDataset

import carprune as cp
from carprune import io
from carprune.groups import Surgery, Unit
from carprune.scoring import FastEngine, NaiveEngine, ScoringSet

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:the scoring set holds a single class")]

# (factory, a plain layer, a layer whose unit is a coupled group: residual, depthwise or SE)
MODELS = [
    ("torchvision.models:resnet18", "layer1.0.conv1", "layer2.0.conv2"),
    ("torchvision.models:mobilenet_v3_small", "features.1.block.2.0", "features.4.block.0.0"),
    ("timm:efficientnet_b0", "blocks.0.0.conv_pw", "blocks.1.0.conv_pw"),
]


def labelled_by_itself(model, n=6, size=64, seed=0):
    """Random images labelled by the model's own predictions: every removal can only cost."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        y = model.eval()(x).argmax(1)
    return ScoringSet.from_any(TensorDataset(x, y), 1000)


@pytest.fixture(scope="module", params=MODELS, ids=[m[0] for m in MODELS])
def real(request):
    torch.manual_seed(0)
    name, plain, coupled = request.param
    model = cp.create_model(name).eval()
    model.carprune_spec = {"arch": {"name": name, "kwargs": {}}, "input_shape": [3, 64, 64]}
    return model, plain, coupled, labelled_by_itself(model)


def test_fast_equals_naive_on_a_plain_and_a_coupled_unit(real):
    model, plain, coupled, scoring = real
    surgery = Surgery(model, scoring.example())
    for layer in (plain, coupled):
        units = [Unit(layer, c) for c in range(0, surgery.size(layer), 6)]
        nb, naive = NaiveEngine().score(surgery, units, scoring)
        fb, fast = FastEngine().score(surgery, units, scoring)
        assert torch.equal(nb.correct, fb.correct) and int(nb.correct[0]) == scoring.total
        assert torch.equal(naive.correct, fast.correct), layer
        assert torch.equal(naive.class_correct, fast.class_correct), layer
        assert torch.allclose(naive.loss, fast.loss, rtol=1e-4), layer


def test_pruned_reloads_without_pickle_with_the_same_outputs(real, tmp_path):
    model, plain, coupled, scoring = real
    result = cp.car_prune(model, scoring, [plain, coupled], keep=0.9,
                          approx=cp.Approximation(step=4), progress=False)
    pruned = result.model
    assert all(rec.filters_after < rec.filters_before for rec in result.layers.values())
    io.save(pruned, tmp_path / "m")
    again = cp.load(tmp_path / "m")
    x = scoring.example()
    with torch.inference_mode():
        assert torch.equal(pruned.eval()(x), again(x))
    assert again.get_submodule(plain).out_channels == pruned.get_submodule(plain).out_channels


def test_pretrained_downloads_are_refused():
    with pytest.raises(cp.CarpruneError, match="never fetches at run time"):
        cp.create_model("timm:resnet18", pretrained=True)
    with pytest.raises(cp.CarpruneError, match="timm has no model 'no_such_net'"):
        cp.create_model("timm:no_such_net")
