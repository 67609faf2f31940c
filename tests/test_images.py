"""Image folders at the model's size: the standard transforms on known images, the bad files a
user's folder holds, data factories, and a pruned model that reloads with its preprocessing."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import carprune as cp
from carprune.data import image_folder, preprocess_for
from carprune.data.folders import eval_transform, read_rgb

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "carprune", *args], capture_output=True,
                          text=True, timeout=900)


def expected(rgb) -> torch.Tensor:
    """A uniform image's pixel after ToTensor and Normalize, by hand."""
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, MEAN, STD, strict=True)])


def test_the_evaluation_transform_on_known_images():
    pre = preprocess_for(None, 32)
    assert pre == {"size": 32, "resize": 37, "mean": list(MEAN), "std": list(STD),
                   "interpolation": "bilinear"}
    uniform = eval_transform(pre)(Image.new("RGB", (300, 200), (200, 100, 50)))
    assert uniform.shape == (3, 32, 32)
    assert torch.allclose(uniform, expected((200, 100, 50)).view(3, 1, 1).expand(3, 32, 32),
                          atol=1e-5)
    # a wide image: the shorter side goes to 37, the centre 32x32 is cut from the middle, so
    # a stripe at the far left (outside the crop) leaves no trace
    wide = Image.new("RGB", (400, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 60, 100))
    out = eval_transform(pre)(wide)
    assert torch.allclose(out, expected((0, 0, 255)).view(3, 1, 1).expand(3, 32, 32),
                          atol=1e-5)


def test_the_models_own_preprocessing_is_the_default():
    timm_net = cp.create_model("timm:efficientnet_b0")
    pre = preprocess_for(timm_net)
    assert (pre["size"], pre["resize"], pre["interpolation"]) == (224, 256, "bicubic")
    assert preprocess_for(timm_net, 112)["resize"] == 128
    torchvision_net = cp.create_model("torchvision.models:resnet18")
    assert preprocess_for(torchvision_net)["size"] == 224


@pytest.mark.parametrize("kind", ["cmyk", "grey16", "one_pixel", "palette", "rgba"])
def test_unusual_images_are_read_correctly(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "cmyk":
        path = tmp_path / "cmyk.jpg"
        Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=100)
        want = (255, 0, 0)
    elif kind == "grey16":
        Image.fromarray(np.full((8, 8), 51000, np.uint16)).save(path)
        want = (198,) * 3  # 51000 / 65535 * 255 = 198.4, scaled, not clipped to 255
    elif kind == "one_pixel":
        Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
        want = (10, 20, 30)
    elif kind == "palette":
        green = Image.new("RGB", (8, 8), (0, 128, 0))
        green.convert("P", palette=Image.Palette.ADAPTIVE).save(path)
        want = (0, 128, 0)
    else:
        Image.new("RGBA", (8, 8), (40, 50, 60, 128)).save(path)
        want = (40, 50, 60)
    image = read_rgb(path)
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image).astype(int) - want).max() <= 2


def folder(root, classes=("a", "b"), per_class=10, size=(40, 30)):
    for i, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            colour = (200 * i, 20 * j, 100)
            Image.new("RGB", (size[0] + j, size[1]), colour).save(root / cls / f"{j}.png")
    return root


def test_a_folder_streams_from_disk_at_the_given_size(tmp_path):
    data = image_folder(folder(tmp_path / "imgs"), preprocess_for(None, 16), workers=0)
    assert data.classes == ["a", "b"] and data.input_shape == (3, 16, 16)
    assert len(data.train) + len(data.val) + len(data.test) == 20
    x, y = data.val[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    assert not data.augment  # the training split crops and flips at random itself
    assert torch.isfinite(data.train[0][0]).all()


@pytest.fixture
def rgb_checkpoint(tmp_path):
    """A two-class RGB convnet at 32 px, saved with its preprocessing."""
    torch.manual_seed(0)
    model = cp.create_model("convnet", in_channels=3, num_classes=2, input_size=32)
    model.carprune_spec = {"arch": {"name": "convnet", "kwargs": {
        "in_channels": 3, "num_classes": 2, "input_size": 32}}, "input_shape": [3, 32, 32],
        "preprocess": preprocess_for(None, 32)}
    cp.save(model, tmp_path / "rgb")
    return tmp_path / "rgb"


@pytest.mark.parametrize("bad", ["text", "truncated"])
def test_a_bad_file_is_one_sentence_with_exit_2(tmp_path, rgb_checkpoint, carprune_cli, bad):
    imgs = folder(tmp_path / "imgs", per_class=6)
    if bad == "text":
        (imgs / "a" / "notes.jpg").write_text("not an image")
    else:
        full = tmp_path / "big.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
                        ).save(full, quality=95)
        (imgs / "a" / "cut.jpg").write_bytes(full.read_bytes()[:600])
    out = tmp_path / "eval.json"
    proc = carprune_cli("evaluate", str(rgb_checkpoint), "--data", str(imgs), "--split",
                        "train", "--workers", "1", "--json", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be read" in lines[0] and "remove or replace it" in \
        lines[0], lines
    assert not out.exists()


def test_mixed_sizes_evaluate_with_the_saved_preprocessing(tmp_path, rgb_checkpoint):
    imgs = folder(tmp_path / "imgs", per_class=6)
    out = tmp_path / "eval.json"
    proc = cli("evaluate", str(rgb_checkpoint), "--data", str(imgs), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = image_folder(imgs, preprocess_for(None, 32), workers=0)
    want = cp.evaluate(cp.load(rgb_checkpoint), data.test)
    got = json.loads(out.read_text())
    assert got["accuracy"] == want.accuracy and got["preprocess"]["size"] == 32


def test_data_from_a_factory(tmp_path, fmnist, carprune_cli):
    (tmp_path / "mydata.py").write_text(textwrap.dedent("""
        import carprune as cp
        from torch.utils.data import TensorDataset

        def splits():
            d = cp.data.fashion_mnist()
            cut = lambda s: TensorDataset(*[t[:300] for t in s.tensors])
            return {"train": cut(d.train), "val": cut(d.val), "test": cut(d.test)}
    """))
    out = tmp_path / "eval.json"
    proc = carprune_cli("evaluate", "convnet-fmnist", "--data", "mydata:splits", "--json",
                        str(out), path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    want = cp.evaluate(cp.load("convnet-fmnist"),
                       torch.utils.data.TensorDataset(*[t[:300] for t in fmnist.test.tensors]))
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(want.accuracy, abs=1e-12)
    proc = carprune_cli("evaluate", "convnet-fmnist", "--data", "mydata:nothing", path=tmp_path)
    assert proc.returncode == 2 and "cannot load the data factory" in proc.stderr


def test_a_pruned_factory_model_reloads_with_its_preprocessing(tmp_path, carprune_cli):
    """prune at 48 px, then evaluate with no --image-size: model.json's preprocessing is used,
    and the accuracy is the one prune reported."""
    (tmp_path / "nets.py").write_text(textwrap.dedent("""
        import torchvision

        def tiny():
            return torchvision.models.resnet18(num_classes=2)
    """))
    imgs = folder(tmp_path / "imgs", per_class=20)
    run = tmp_path / "run"
    proc = carprune_cli("prune", "--model", "nets:tiny", "--data", str(imgs), "--image-size",
                        "48", "--layers", "layer1.0.conv1", "--keep", "60", "--step", "2",
                        "--finetune-epochs", "0", "--workers", "1", "--out", str(run),
                        path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "random weights" in proc.stderr
    result = json.loads((run / "result.json").read_text())
    spec = json.loads((run / "model.json").read_text())
    assert spec["preprocess"]["size"] == 48 and spec["input_shape"] == [3, 48, 48]
    out = tmp_path / "eval.json"
    proc = carprune_cli("evaluate", str(run), "--data", str(imgs), "--json", str(out),
                        path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(out.read_text())
    assert evaluated["preprocess"]["size"] == 48
    assert evaluated["accuracy"] == pytest.approx(result["accuracy"]["test_finetuned"],
                                                  abs=1e-12)
