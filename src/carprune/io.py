"""Checkpoints without pickle: `model.safetensors` for tensors, `model.json` for everything else.

`model.json` names the architecture (a zoo name or a `module:function` factory, with its
arguments) and Torch-Pruning's pruning history, so a pruned network is rebuilt by replaying the
removals on a fresh instance. Every file is written to a temporary name, fsynced and renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save as tensors_to_bytes
from torch import nn

from .errors import CarpruneError
from .layout import arrange, example_of
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


@torch.inference_mode(False)  # ordinary weights even when loaded under inference mode
def build(spec: dict) -> nn.Module:
    """A fresh model for `spec`: the architecture, then the recorded channel removals."""
    arch = spec.get("arch")
    if not isinstance(arch, dict) or "name" not in arch:
        raise CarpruneError("model.json has no architecture entry; restore it from the run "
                            "that wrote it")
    model = create_model(arch["name"], **arch.get("kwargs", {}))
    history = spec.get("pruning_history") or []
    if history:
        from .dependency import replay_history

        replay_history(model, spec["input_shape"], history)
    model.carprune_spec = spec
    return model


def save(model: nn.Module, out_dir: str | os.PathLike, extra: dict | None = None) -> None:
    """Write `model.safetensors` and `model.json` into out_dir (atomically, file by file);
    nothing, not even the directory, when the model cannot be saved."""
    if not isinstance(model, nn.Module):
        raise CarpruneError(f"save takes a network (an nn.Module), not a {type(model).__name__}; "
                            "pass the network it holds (a prune result's .model)")
    spec = dict(spec_of(model), format=FORMAT, **(extra or {}))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = tensors_to_bytes(tensors, metadata={"architecture_sha256": _architecture_sha(spec)})
    spec["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.safetensors", blob)
    write_json(out / "model.json", spec)


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a saved model from model.json + model.safetensors; never unpickles anything.

    The model comes back in the layout carprune computes it in (channels_last where it works,
    layout.py), so its outputs are bit-identical to those of the saved model at the end of a
    run."""
    directory = resolve_checkpoint(path)
    spec = read_json(directory / "model.json")
    if not isinstance(spec, dict):
        raise CarpruneError(f"{directory / 'model.json'} is not a carprune model description; "
                            "restore it from the run that wrote it")
    weights_path = directory / "model.safetensors"
    if not weights_path.is_file():
        raise CarpruneError(f"{weights_path} does not exist; the checkpoint is incomplete, "
                            "re-run the command that wrote it")
    blob = weights_path.read_bytes()
    _refuse_pickle(blob, weights_path)
    if hashlib.sha256(blob).hexdigest() != spec.get("weights_sha256"):
        raise CarpruneError(f"{weights_path} does not match the checksum in model.json (the "
                            "file is damaged or from another run); restore the pair written "
                            "together")
    try:
        state = tensors_from_bytes(blob)
        header = safe_open_metadata(blob)
    except (SafetensorError, OSError, ValueError, struct.error) as exc:
        raise CarpruneError(f"{weights_path} is not a readable safetensors file ({exc}); "
                            "restore it from the run that wrote it") from None
    if header.get("architecture_sha256") != _architecture_sha(spec):
        raise CarpruneError(f"the architecture in {directory / 'model.json'} is not the one "
                            "these weights were saved with (model.json was edited or damaged); "
                            "restore the pair written together")
    model = build(spec)
    check_state_fits(model, state, weights_path)
    load_state(model, state)
    # the layout every carprune run computes it in, so a reloaded model gives bit-identical
    # outputs to the one that was saved
    if spec.get("input_shape"):
        arrange(model.eval(), example_of(spec["input_shape"]))
    return model.eval()


_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _refuse_pickle(blob: bytes, path) -> None:
    if blob.startswith(_PICKLE_MAGIC):
        raise CarpruneError(f"{path} is a pickle (torch.save) file, which can run arbitrary "
                            "code when loaded; convert it to safetensors, or pass "
                            "--trust-pickle to load it with torch.load(weights_only=True)")


def read_weights(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or (only when trusted) from a torch.save file,
    which is then read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CarpruneError(f"weights file {path} does not exist; check the --weights path")
    blob = path.read_bytes()
    if not trust_pickle:
        _refuse_pickle(blob, path)
    if blob.startswith(_PICKLE_MAGIC):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for bad files
            raise CarpruneError(f"{path} cannot be read as a weights-only torch file ({exc}); "
                                "save the state dict with torch.save or safetensors") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    else:
        try:
            state = tensors_from_bytes(blob)
        except (SafetensorError, ValueError) as exc:
            raise CarpruneError(f"{path} is not a readable safetensors file ({exc}); give a "
                                "safetensors or (with --trust-pickle) a torch.save file") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CarpruneError(f"{path} does not hold a state dict of tensors; save "
                            "model.state_dict()")
    return state


def from_factory(name: str, weights: str | os.PathLike | None,
                 trust_pickle: bool = False) -> nn.Module:
    """A model from a zoo name, `timm:NAME` or `package.module:function` factory, with optional
    weights; `attach_data` completes the spec that lets `save` and `load` rebuild it. The spec
    holds the weights file's sha256, so that a run resumed after the file changed at the same
    path is refused (`save` replaces it with its own file's)."""
    model = create_model(name)
    digest = None
    if weights is not None:
        state = read_weights(weights, trust_pickle)
        digest = file_sha256(weights)
        check_state_fits(model, state, weights, against=f"the network {name} builds",
                         fix=f"give the state_dict() of a network {name} builds, or the "
                         "factory of the network these weights came from")
        load_state(model, state)
    else:
        warnings.warn(f"{name} has random weights (no --weights): fine for timing and trying "
                      "the tool, meaningless for accuracy", stacklevel=2)
    model.carprune_spec = {"arch": {"name": name, "kwargs": {}}, "weights_sha256": digest}
    return model.eval()  # `attach_data` gives it the layout `load` gives a checkpoint


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in pieces (weights files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(2**22), b""):
            digest.update(piece)
    return digest.hexdigest()


def attach_data(model: nn.Module, data) -> None:
    """Record the input a factory model gets: image shape, data set, preprocessing; and give
    it the layout `load` gives a checkpoint (layout.py), so that the same weights compute the
    same outputs whichever door they came through."""
    model.carprune_spec.update(input_shape=list(data.input_shape), data=data.describe())
    arrange(model, example_of(data.input_shape))
    if data.preprocess:
        model.carprune_spec["preprocess"] = data.preprocess


def load_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """`model.load_state_dict(state)` with the version metadata a fresh `state_dict()` of the
    model carries, which safetensors files lack and some modules' loaders read (torchvision's
    MNASNet refuses a state without it)."""
    with_metadata = OrderedDict(state)
    with_metadata._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    model.load_state_dict(with_metadata, strict=strict)


def _architecture_sha(spec: dict) -> str:
    """Checksum of what decides the network's shape, stored inside the weights file."""
    arch = {k: spec.get(k) for k in ("arch", "input_shape", "pruning_history")}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()


def safe_open_metadata(blob: bytes) -> dict:
    """The metadata of a safetensors byte string (its JSON header's __metadata__)."""
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]).get("__metadata__") or {}


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], source,
                     against: str = "the model in model.json",
                     fix: str = "pair the weights with the model.json they were saved with"
                     ) -> None:
    """Refuse weights that `load_state_dict` would reject or that would compute NaN, naming
    what they were checked `against` (a checkpoint's model.json, or a factory's network) and
    the `fix` that fits that case."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CarpruneError(f"{source} does not fit {against} (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); {fix}")
    for key in expected:  # in the network's order: the first layer that differs is named
        tensor = state[key]
        if tensor.shape != expected[key].shape:
            raise CarpruneError(f"{source}: {key} has shape {tuple(tensor.shape)} but "
                                f"{against} needs {tuple(expected[key].shape)}; {fix}")
        if tensor.dtype != expected[key].dtype:
            raise CarpruneError(f"{source}: {key} has dtype {tensor.dtype} but {against} "
                                f"needs {expected[key].dtype}; save the weights in the model's "
                                "own dtype")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CarpruneError(f"{source}: {key} holds NaN or inf values; the weights are "
                                "broken, retrain or restore them")
