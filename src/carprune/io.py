"""Checkpoints without pickle: `model.safetensors` for tensors, `model.json` for everything else.

`model.json` names the architecture (a zoo name or a `module:function` factory, with its
arguments) and Torch-Pruning's pruning history, so a pruned network is rebuilt by replaying the
removals on a fresh instance. Every file is written to a temporary name, fsynced and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CarpruneError
from .models import create_model

FORMAT = "carprune-checkpoint/1"
ZOO_DIR = Path(__file__).parent / "zoo"


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file so that a crash leaves either the old content or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CarpruneError(f"{path} does not exist; give a checkpoint directory written by "
                            "carprune train or prune") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CarpruneError(f"{path} is not valid JSON ({exc}); restore it from the run that "
                            "wrote it") from None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the name of one shipped with carprune (e.g. convnet-fmnist)."""
    p = Path(path)
    if p.is_dir():
        return p
    if (ZOO_DIR / str(path)).is_dir():
        return ZOO_DIR / str(path)
    shipped = ", ".join(sorted(d.name for d in ZOO_DIR.iterdir() if d.is_dir())) \
        if ZOO_DIR.is_dir() else "none"
    raise CarpruneError(f"checkpoint {path} is not a directory; give a directory holding "
                        f"model.safetensors and model.json, or a shipped one ({shipped})")


def spec_of(model: nn.Module) -> dict:
    spec = getattr(model, "carprune_spec", None)
    if spec is None:
        raise CarpruneError("this model has no carprune spec (architecture and data); build it "
                            "with carprune.build or load it with carprune.load before saving")
    return spec


def build(spec: dict) -> nn.Module:
    """A fresh model for `spec`: the architecture, then the recorded channel removals."""
    arch = spec.get("arch")
    if not isinstance(arch, dict) or "name" not in arch:
        raise CarpruneError("model.json has no architecture entry; restore it from the run "
                            "that wrote it")
    model = create_model(arch["name"], **arch.get("kwargs", {}))
    history = spec.get("pruning_history") or []
    if history:
        from .groups import replay_history

        replay_history(model, spec["input_shape"], history)
    model.carprune_spec = spec
    return model


def save(model: nn.Module, out_dir: str | os.PathLike, extra: dict | None = None) -> None:
    """Write `model.safetensors` and `model.json` into out_dir (atomically, file by file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(spec_of(model), format=FORMAT, **(extra or {}))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / "model.safetensors")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    write_json(out / "model.json", spec)


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a saved model from model.json + model.safetensors; never unpickles anything."""
    directory = resolve_checkpoint(path)
    spec = read_json(directory / "model.json")
    weights_path = directory / "model.safetensors"
    if not weights_path.is_file():
        raise CarpruneError(f"{weights_path} does not exist; the checkpoint is incomplete, "
                            "re-run the command that wrote it")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CarpruneError(f"{weights_path} is not a readable safetensors file ({exc}); "
                            "restore it from the run that wrote it") from None
    model = build(spec)
    check_state_fits(model, state, weights_path)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CarpruneError(f"{source} does not fit the model in model.json (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}); pair the weights with "
                            "the model.json they were saved with")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CarpruneError(f"{source}: {key} has shape {tuple(tensor.shape)} but the model "
                                f"needs {tuple(expected[key].shape)}; pair the weights with the "
                                "model.json they were saved with")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CarpruneError(f"{source}: {key} holds NaN or inf values; the weights are "
                                "broken, retrain or restore them")
