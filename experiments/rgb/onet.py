"""MTCNN's pretrained ONet (Zhang et al. 2016, the output network of the face detector) as a
face/non-face classifier: carprune's zoo model `onet` with the weights of facenet-pytorch 2.6.0
(MIT), which ships them in its wheel as `facenet_pytorch/data/onet.pt` (a `torch.save`d state
dict). facenet-pytorch pins old torch and torchvision releases, so it is installed without its
dependencies (`make rgb`, or `pip install --no-deps facenet-pytorch==2.6.0`) and never
imported: the data file is found with `importlib.util.find_spec`, which locates a top-level
package without running its `__init__`, and read with `torch.load(weights_only=True)`.

What differs from facenet-pytorch's ONet, none of which changes the face decision:

- only the face/non-face head (`dense6_1`) is kept, and it returns logits; the original applies
  a softmax (probabilities are `logits.softmax(1)`, index 1 is "face") and also has a box
  regression head (`dense6_2`) and a landmark head (`dense6_3`), dropped here;
- the original flattens conv4's output after `permute(0, 3, 2, 1)`, i.e. in (width, height,
  channel) order (the layout of the Caffe/TensorFlow weights it was converted from); the zoo
  model flattens in the usual (channel, height, width) order and `dense5`'s columns are permuted
  once at load time to match, so the network is a plain conv stack that Torch-Pruning's
  dependency graph understands (pruning conv4 then removes the right columns of dense5).

Input: 3 x 48 x 48 RGB (not BGR), pixels scaled as MTCNN does, (x - 127.5) * 0.0078125, which
is `cp.data.normalise` with `ONET_STATS`. MTCNN resizes its windows to 48 x 48 with area
interpolation, as `cp.data.photo_windows` does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

import carprune as cp
from carprune.data.photos import package_file

# (x / 255 - 0.5) / (128 / 255) == (x - 127.5) / 128 == (x - 127.5) * 0.0078125
ONET_STATS = ((0.5, 0.5, 0.5), (128 / 255, 128 / 255, 128 / 255))
ONET_INPUT_SHAPE = (3, 48, 48)
FACENET_PACKAGE = "facenet_pytorch"
FACENET_VERSION = "2.6.0"
INSTALL_HINT = ("run `make rgb`, or `.venv/bin/pip install --no-deps "
                f"facenet-pytorch=={FACENET_VERSION}` (without its dependencies: it pins an old "
                "torch)")
DROPPED_HEADS = ("dense6_2.", "dense6_3.")  # box regression and landmarks
_CONV4_SHAPE = (128, 3, 3)  # conv4's output per image: channels, height, width


def from_original_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facenet-pytorch's ONet state dict -> the zoo model's: the box and landmark heads
    dropped, dense5's columns reordered from the original's (width, height, channel) flatten to
    (channel, height, width). Raises CarpruneError when the dict is not ONet's."""
    expected = cp.create_model("onet").state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith(DROPPED_HEADS)}
    wrong = sorted(set(kept) ^ set(expected)) + sorted(
        k for k in set(kept) & set(expected) if tuple(kept[k].shape) != tuple(expected[k].shape))
    if wrong:
        raise cp.CarpruneError(f"the weights are not MTCNN ONet's (keys or shapes differ: "
                               f"{', '.join(wrong[:4])}); reinstall facenet-pytorch=="
                               f"{FACENET_VERSION}")
    out = {k: v.detach().clone() for k, v in kept.items()}
    channels, height, width = _CONV4_SHAPE
    w = out["dense5.weight"]
    out["dense5.weight"] = (w.reshape(len(w), width, height, channels)
                            .permute(0, 3, 2, 1).reshape(len(w), -1).contiguous())
    return out


def original_weights_path() -> Path:
    """Where facenet-pytorch's onet.pt is, found without importing the package (which would
    import torchvision)."""
    spec = importlib.util.find_spec(FACENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise cp.CarpruneError(f"the pretrained ONet needs facenet-pytorch's weights; "
                               f"{INSTALL_HINT}")
    path = package_file(FACENET_PACKAGE, "data/onet.pt")
    if path is None:
        raise cp.CarpruneError(f"facenet-pytorch is installed without data/onet.pt; reinstall "
                               f"it: {INSTALL_HINT}")
    return path


def load_onet(path: str | Path) -> nn.Module:
    """ONet with the weights of an original-layout state dict file (read as weights only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (unpickling errors come in many types)
        raise cp.CarpruneError(f"{path} is not a readable ONet state dict ({exc}); reinstall "
                               f"facenet-pytorch=={FACENET_VERSION}") from None
    if not isinstance(state, dict):
        raise cp.CarpruneError(f"{path} does not hold a state dict; reinstall "
                               f"facenet-pytorch=={FACENET_VERSION}")
    model = cp.create_model("onet")
    model.load_state_dict(from_original_state(state), strict=True)
    model.carprune_spec = {"arch": {"name": "onet", "kwargs": {}},
                           "input_shape": list(ONET_INPUT_SHAPE),
                           "weights": f"facenet-pytorch {FACENET_VERSION} data/onet.pt "
                                      "(MTCNN ONet, face/non-face head)"}
    return model.eval()


def pretrained_onet() -> nn.Module:
    """MTCNN's pretrained ONet from the installed facenet-pytorch, or CarpruneError with the
    command that installs it."""
    return load_onet(original_weights_path())
