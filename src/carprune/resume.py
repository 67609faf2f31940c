"""Run directories that survive a kill: state after every greedy step or global round, and every
epoch.

DIR/.carprune-state/state.json holds the run's configuration and everything decided so far
(the CAR steps of a per-layer run, the rounds of a global one, the fine-tuning log); the
tensors of the current fine-tuning epoch (weights, optimizer buffers, RNG states) sit in a
safetensors file named in state.json. Every file is written atomically and state.json last, so
a kill at any instant leaves the old state or the new one. Re-running the same command resumes;
a different configuration is refused.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes
from torch import nn

from . import dist
from .car.records import GlobalProgress, GlobalStep, LayerRecord, Step
from .errors import CarpruneError
from .io import atomic_write, load_state, read_json, write_json
from .train import TrainState

STATE_DIR = ".carprune-state"


def _is_run_dir(path: Path) -> bool:
    return (path / STATE_DIR).is_dir() or (path / "result.json").is_file()


class RunState:
    def __init__(self, out: Path, config: dict, saved: dict | None):
        self.out, self.config = out, config
        self.dir = out / STATE_DIR
        self.saved = saved or {}

    @classmethod
    def open(cls, out: str | Path, config: dict, restart: bool = False) -> RunState:
        """Refuse what must not be overwritten; return the state to resume (maybe empty).
        Writes nothing: the directory appears with the first saved step."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise CarpruneError(f"{out} is a file; choose a directory for --out")
        if restart and dist.is_main() and out.is_dir() and any(out.iterdir()):
            if not _is_run_dir(out):
                raise CarpruneError(f"{out} is not a carprune run directory, so --restart will "
                                    "not delete it; choose another --out")
            shutil.rmtree(out)
        if restart and dist.active():
            dist.barrier()  # nobody reads the old state after rank 0 discarded it
        state_file = out / STATE_DIR / "state.json"
        if state_file.is_file():
            saved = read_json(state_file)
            old = saved.get("config", {})  # an option added since, unset, is no difference
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            if diff:
                raise CarpruneError(f"{out} holds an unfinished run with a different "
                                    f"configuration ({', '.join(diff)} differ); run the same "
                                    "command to resume it, or add --restart to discard it")
            return cls(out, config, saved)
        if out.is_dir() and any(out.iterdir()):
            what = "a finished run" if _is_run_dir(out) else "other files"
            raise CarpruneError(f"output directory {out} already holds {what}; choose another "
                                "--out or add --restart to discard a previous run")
        return cls(out, config, None)

    # -- CAR steps --------------------------------------------------------------------------
    def layers(self) -> dict[str, LayerRecord]:
        out = {}
        for name, rec in self.saved.get("layers", {}).items():
            steps = [Step(s["removed"], _accuracy(s["val_accuracy"]), s["candidates"], s["car"])
                     for s in rec["steps"]]
            out[name] = LayerRecord(rec["filters_before"], rec["filters_after"],
                                    rec["removed"], steps)
        return out

    def save_layers(self, records: dict[str, LayerRecord], val_before: float) -> None:
        layers = {name: asdict(rec) for name, rec in records.items()}
        for rec in layers.values():
            for step in rec["steps"]:
                step["val_accuracy"] = _json_accuracy(step["val_accuracy"])
        self.saved.update(layers=layers, val_before=val_before)
        self._write()

    # -- global CAR rounds ------------------------------------------------------------------
    def global_progress(self) -> GlobalProgress | None:
        """What an interrupted global run had done; None when it had not finished a round."""
        saved = self.saved.get("global")
        if saved is None:
            return None
        rounds = [[GlobalStep(**{**s, "val_accuracy": _accuracy(s["val_accuracy"])}) for s in r]
                  for r in saved["rounds"]]
        last = {(layer, original): (lost, worse) for layer, original, lost, worse in saved["last"]}
        return GlobalProgress(rounds, last, saved["images"], saved["val_before"], saved["meter"])

    def save_global(self, progress: GlobalProgress) -> None:
        rounds = [[{**asdict(st), "val_accuracy": _json_accuracy(st.val_accuracy)} for st in r]
                  for r in progress.rounds]
        self.saved["global"] = {
            "rounds": rounds, "last": [[*unit, *lost] for unit, lost in progress.last.items()],
            "images": progress.images, "val_before": progress.val_before,
            "meter": progress.meter}
        self._write()

    # -- fine-tuning ------------------------------------------------------------------------
    def save_training(self, model: nn.Module, state: TrainState) -> None:
        if not dist.is_main():
            return
        tensors = {f"model.{k}": v.detach().contiguous().cpu()
                   for k, v in model.state_dict().items()}
        for idx, buffers in state.optimizer["state"].items():
            for key, value in buffers.items():
                tensors[f"optimizer.{idx}.{key}"] = value.detach().contiguous().cpu()
        tensors["generator"] = state.generator
        tensors["torch_rng"] = state.torch_rng
        name = f"training-{state.epoch}.safetensors"
        self._guard(lambda: atomic_write(self.dir / name, tensors_to_bytes(tensors)))
        previous = self.saved.get("training", {}).get("file")
        self.saved["training"] = {"file": name, "epoch": state.epoch, "log": state.log,
                                  "param_groups": state.optimizer["param_groups"]}
        self._write()
        if previous and previous != name:
            (self.dir / previous).unlink(missing_ok=True)

    def training(self, model: nn.Module) -> TrainState | None:
        """Restore the last saved epoch into `model`; None when fine-tuning had not begun."""
        info = self.saved.get("training")
        if not info:
            return None
        tensors = load_file(self.dir / info["file"])
        load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        optimizer = {"state": state, "param_groups": info["param_groups"]}
        return TrainState(info["epoch"], optimizer, tensors["generator"], tensors["torch_rng"],
                          info["log"])

    def finish(self) -> None:
        if dist.is_main():
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- writing ----------------------------------------------------------------------------
    def _write(self) -> None:
        """Rank 0 writes; every rank reads the same state when a run resumes."""
        if not dist.is_main():
            return
        self.saved["config"] = self.config
        self._guard(lambda: write_json(self.dir / "state.json", self.saved))

    def _guard(self, write) -> None:
        try:
            write()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CarpruneError(f"the disk is full while writing the run state in "
                                    f"{self.dir}; free space and run the same command to "
                                    "resume from the last saved step") from None
            raise


def _json_accuracy(accuracy: float) -> float | None:
    """A step's accuracy for JSON: null while the step is not measured yet (NaN)."""
    return None if accuracy != accuracy else accuracy


def _accuracy(value: float | None) -> float:
    """A step's accuracy read back: NaN for a step not measured yet."""
    return float("nan") if value is None else value
