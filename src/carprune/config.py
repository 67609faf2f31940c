"""Every option of every command, declared once: its default, its help, and its check.

One dataclass per command (as Hugging Face's `TrainingArguments` is the whole option surface of
a training job). `cli.py` derives the parser from these fields, the commands and the Python
API take them, resume compares them, and `result.json` records them. Building one checks it:
a bad value raises the same `CarpruneError` (one sentence naming the fix) whether it came from
the command line or from Python.

A field's metadata holds `help`, an optional `check(value, flag)` and any argparse keywords
(`type`, `choices`, `nargs`, `metavar`, `required`, `positional`) that the annotation alone does
not give.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from .car.settings import Approximation, Budget, EngineOptions, check_global, check_keep
from .criteria import CRITERIA
from .devices import resolve_device
from .distill import DISTILL_WEIGHT, HINT_WEIGHT, TEMPERATURE
from .errors import CarpruneError
from .scoring import DEFAULT_MEMORY_BUDGET, ENGINES
from .scoring.compensation import RIDGE


def option(default, help: str, check: Callable | None = None, **cli):
    """A config field: default, help, check and the argparse keywords the type does not say."""
    kind = {"default_factory": lambda: list(default)} if isinstance(default, list) \
        else {"default": default}
    return field(**kind, metadata={"help": help, "check": check, "cli": cli})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# -- value checks: (value, flag) -> raise CarpruneError with the fix -------------------------

def positive(value, name: str) -> None:
    if value is not None and not value > 0:  # NaN too
        raise CarpruneError(f"{name} must be positive, got {value}")


def at_least(low: int) -> Callable:
    def check(value, name: str) -> None:
        if value is not None and value < low:
            raise CarpruneError(f"{name} must be {low} or more, got {value}")
    return check


def fraction(value, name: str) -> None:
    if value is not None and not 0 < value < 1:
        raise CarpruneError(f"{name} must be a fraction in (0, 1), got {value}")


def keep_value(value, name: str) -> None:
    check_keep(value)


# -- argparse value types ------------------------------------------------------------------

def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use a fraction like 0.5 "
                                         "or a count like 16") from None


def csv(kind) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                             f"{kind.__name__} values") from None
    return parse


def layer_value(kind) -> Callable[[str], tuple[str, float]]:
    def parse(text: str) -> tuple[str, float]:
        name, sep, value = text.partition("=")
        try:
            if not (name and sep):
                raise ValueError
            return name, kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not LAYER=VALUE, e.g. conv1=0.5"
                                             ) from None
    return parse


class Config:
    """Checks every field on construction, then the rules between fields (`check_together`)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            cli, value = f.metadata["cli"], getattr(self, f.name)
            if value is None and (cli.get("required") or
                                  cli.get("positional") and "nargs" not in cli):
                name = f.name if cli.get("positional") else flag(f.name)
                raise CarpruneError(f"{name} is required: {f.metadata['help']}")
            choices = cli.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise CarpruneError(f"{flag(f.name)} takes {', '.join(map(str, choices))}, got "
                                    f"{value!r}")
            check = f.metadata.get("check")
            if check is not None:
                check(getattr(self, f.name), flag(f.name))
        self.check_together()

    def check_together(self) -> None:
        """Rules between fields; each config adds its own."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


CHECKPOINT_HELP = "checkpoint directory or shipped name (convnet-fmnist)"


def device_name(value: str, name: str) -> None:
    resolve_device(value)


@dataclass
class DeviceOptions(Config):
    device: str = option("auto", "where the work runs: auto (a GPU if CUDA sees one), cpu, "
                         "cuda or cuda:N", device_name)


@dataclass
class DataOptions(DeviceOptions):
    data: str = option("fashion-mnist", "fashion-mnist, fashion-mnist-colour (randomly tinted), "
                       "mnist (with --data-dir), an image folder, or package.module:function "
                       "returning (train, val, test) Datasets")
    data_dir: str | None = option(None, "folder with the IDX files (default: Debian's path or "
                                  "$CARPRUNE_DATA)")
    image_size: int | None = option(None, "side of the images the network sees, for image "
                                    "folders and data factories (default: the model's own, "
                                    "else 224)", at_least(8))
    workers: int | None = option(None, "DataLoader processes reading image files (default: the "
                                 "cores but one, at most 8)", at_least(0))


@dataclass
class ModelOptions(DataOptions):
    """The door to a network for commands that read one: a checkpoint (each command declares
    its positional CHECKPOINT) or a factory with weights; `commands.common.open_model` opens
    either."""

    model: str | None = option(None, "instead of a checkpoint: a factory package.module:function "
                               "(or a zoo name, or timm:NAME), e.g. torchvision.models:resnet18")
    weights: str | None = option(None, "with --model: a safetensors state dict (or, with "
                                 "--trust-pickle, a torch.save file, read with weights_only)")
    trust_pickle: bool = option(False, "allow --weights to be a pickle (torch.save) file")


@dataclass
class TrainConfig(DataOptions):
    out: str = option(None, "checkpoint directory to write", required=True)
    model: str = option("convnet", "a zoo model (see carprune.models.list_models())")
    epochs: int = option(12, "training epochs", at_least(0))
    lr: float = option(0.05, "learning rate", positive)
    batch_size: int = option(128, "images per batch", at_least(1))
    seed: int = option(0, "seed for the data order and the initial weights")


@dataclass
class EvaluateConfig(ModelOptions):
    checkpoint: str | None = option(None, CHECKPOINT_HELP, positional=True, nargs="?")
    split: str = option("test", "split to evaluate", choices=["test", "val", "train"])
    json: str | None = option(None, "also write the figures to this JSON file")


@dataclass
class PruneConfig(ModelOptions):
    """`carprune prune`: per-layer CAR to `keep`, or global CAR under one budget."""

    out: str = option(None, "run directory; re-running the same command there resumes the run",
                      required=True)
    checkpoint: str | None = option(None, CHECKPOINT_HELP, positional=True, nargs="?")
    layers: list[str] | None = option(None, "conv or hidden linear layers, pruned in order "
                                      "(with a target: the layers of the global run; default "
                                      "every prunable conv)")
    keep: float = option(0.5, "per layer: a fraction in (0, 1) or a count of filters (default "
                         "0.5)", type=number)
    target_macs: float | None = option(None, "global CAR until this fraction of the original "
                                       "MACs is left", fraction)
    target_params: float | None = option(None, "global CAR until this fraction of the original "
                                         "parameters is left", fraction)
    target_latency_ms: float | None = option(None, "global CAR until one image (batch 1) runs "
                                             "in this many milliseconds here", positive)
    cost: str | None = option(None, "what a removal saves, for global CAR's accuracy-per-cost "
                              "ranking (default: what the target counts)",
                              choices=["macs", "params", "latency"])
    min_keep: float = option(0.1, "global CAR keeps at least this fraction of every layer "
                             "(default 0.1)")
    round_to: int = option(1, "global CAR leaves every layer a multiple of N filters (8 suits "
                           "AVX2 CPUs: odd widths can run slower than the unpruned network)")
    ignore: list[str] | None = option(None, "layers global CAR must not prune (e.g. the stem)")
    compensate: bool = option(False, "refit the layers that read a pruned filter's channel by "
                              "least squares on the rest, when scoring and when removing")
    ridge: float | None = option(None, "with --compensate: the least-squares fit's damping, "
                                 f"relative to the Gram diagonal's mean (default {RIDGE:g})",
                                 positive)
    labels: str = option("data", "score against the labels, or against the unpruned model's "
                         "predictions (for unlabelled images)", choices=["data", "model"])
    classes: list[str] | None = option(None, "specialise the network to these classes (names "
                                       "or output indices, two or more): its classifier keeps "
                                       "their outputs, every split their images, and CAR "
                                       "measures the accuracy on them")
    criterion: str = option("car", "car (default) or another criterion to compare with",
                            choices=[c for c in CRITERIA if c != "car-oneshot"])
    step: int = option(1, "filters removed per re-scoring; 1 is exact greedy CAR (default)")
    screen: int | None = option(None, "approximate: after the first full scoring, re-score only "
                                "the M filters with the lowest CAR index so far")
    shortlist: int | None = option(None, "approximate, for global runs on big networks: every "
                                   "round, from the first, score exactly only the M units a "
                                   "first-order estimate ranks first per saving", positive)
    race: int | None = option(None, "approximate, with --shortlist: estimate and score the "
                              "shortlist on the first N scoring images, then only its best "
                              "2 x --step on all of them", positive)
    blocks: float | None = option(None, "approximate, for global runs on networks too big for a "
                                  "candidate per filter: every round each layer offers the "
                                  "fraction F of its filters a first-order estimate ranks least "
                                  "needed, scored jointly; the best --step blocks go", fraction)
    score_samples: int | None = option(None, "score on the first N val images only (default: "
                                       "all)", positive)
    engine: str = option("fast", "the scoring engine", choices=list(ENGINES))
    memory_budget: float = option(DEFAULT_MEMORY_BUDGET / 2**30, "GiB the scoring set and the "
                                  "fast engine's candidate batches may use, of GPU memory on a "
                                  "GPU (default 2)", positive)
    finetune_epochs: int = option(2, "epochs of fine-tuning after pruning", at_least(0))
    finetune_lr: float = option(0.01, "fine-tuning learning rate", positive)
    distill: bool = option(False, "fine-tune towards the unpruned network's outputs and "
                           "classifier features as well as the labels (knowledge distillation: "
                           f"{DISTILL_WEIGHT} of the KL divergence from its outputs softened at "
                           f"temperature {TEMPERATURE:g}, plus {HINT_WEIGHT:g} x the relative "
                           "squared difference of the features its classifier reads)")
    train_samples: int | None = option(None, "fine-tune on the first N training images only "
                                       "(default: all)", positive)
    seed: int = option(0, "seed for fine-tuning and for --criterion random")
    restart: bool = option(False, "discard an unfinished or finished run in --out and start "
                           "again")

    @property
    def budget(self) -> tuple[str, float | None]:
        """The global run's budget kind and target; (macs, None) for a per-layer run."""
        given = {kind: value for kind, value in (("macs", self.target_macs),
                                                 ("params", self.target_params),
                                                 ("latency", self.target_latency_ms))
                 if value is not None}
        return next(iter(given.items()), ("macs", None))

    def approximation(self) -> Approximation:
        """The run's approximation (a per-layer run refuses what only a global run does)."""
        fields = (self.step, self.screen, self.shortlist, self.race, self.blocks)
        return Approximation.per_layer(*fields) if self.budget[1] is None \
            else Approximation(*fields)

    def engine_options(self) -> EngineOptions:
        return EngineOptions(self.engine, int(self.memory_budget * 2**30), self.compensate,
                             RIDGE if self.ridge is None else self.ridge)

    def budget_settings(self) -> Budget:
        """A global run's budget (its target is `budget`'s second half)."""
        return Budget(self.budget[0], self.cost, self.min_keep, self.round_to, self.ignore or ())

    def check_together(self) -> None:
        """The settings check themselves; what is left is which run the options ask for."""
        targets = [self.target_macs, self.target_params, self.target_latency_ms]
        if sum(t is not None for t in targets) > 1:
            raise CarpruneError("give one budget: --target-macs, --target-params or "
                                "--target-latency-ms, not several")
        approx = self.approximation()
        if self.budget[1] is None:
            check_keep(self.keep)
            if not self.layers:
                raise CarpruneError("name the layers to prune with --layers, or give "
                                    "--target-macs, --target-params or --target-latency-ms for "
                                    "a global run")
            if self.round_to != 1:
                raise CarpruneError("--round-to applies to global runs (--target-macs, "
                                    "--target-params or --target-latency-ms); per layer, give "
                                    "--keep as a count of filters")
        else:
            check_global(approx, self.budget_settings())
        self.engine_options()
        if self.compensate and self.criterion != "car":
            raise CarpruneError(f"--compensate refits layers for CAR; it does not apply to "
                                f"--criterion {self.criterion}, drop one of the two")


@dataclass
class CompareConfig(DataOptions):
    checkpoint: str = option(None, CHECKPOINT_HELP, positional=True)
    out: str = option(None, "output directory", required=True)
    layers: list[str] = option(None, "conv or hidden linear layers, each compared on its own",
                               required=True)
    criteria: list[str] = option(list(CRITERIA), f"comma-separated (default: all: "
                                 f"{','.join(CRITERIA)})", type=csv(str), nargs=None)
    keep_grid: list[float] = option([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
                                    "comma-separated fractions of filters kept",
                                    type=csv(float), nargs=None)
    retrain_epochs: int = option(0, "retrain each criterion's keep-0.5 network this many "
                                 "epochs", at_least(0))
    seeds: int = option(3, "seeds for random and for retraining (spread reported)",
                        at_least(1))
    score_samples: int | None = option(None, "score on the first N val images only", positive)
    train_samples: int | None = option(None, "retrain on the first N training images only "
                                       "(default: all)", positive)

    def check_together(self) -> None:
        unknown = [c for c in self.criteria if c not in CRITERIA]
        if unknown:
            raise CarpruneError(f"unknown criterion {unknown[0]!r}; choose from "
                                f"{', '.join(CRITERIA)}")
        if not self.keep_grid or any(not 0 < k <= 1 for k in self.keep_grid):
            raise CarpruneError("--keep-grid takes fractions in (0, 1], e.g. "
                                "1.0,0.75,0.5,0.25")


@dataclass
class BenchConfig(DataOptions):
    checkpoint: str = option("convnet-fmnist", CHECKPOINT_HELP, positional=True, nargs="?")
    out: str = option("runs/bench", "output directory for bench.json")
    layers: list[str] | None = option(None, "default: every conv layer")
    steps: int = option(3, "greedy steps per layer (default 3)", at_least(1))
    score_samples: int | None = option(None, "score on the first N val images only", positive)
    keep: float = option(0.5, "keep for the whole timed run", keep_value, type=number)
    kinds: bool = option(False, "bench every unit kind on the reference networks "
                         "(convnet-fmnist, resnet20, mobilenet, inception; torchvision resnet18, "
                         "timm convnext_atto and regnetx_002 at 64 px) instead of one "
                         "checkpoint's layers")
    whole_run: bool = option(False, "also time exact fast CAR of every layer to --keep, end to "
                             "end (about 4 more minutes on two cores)")
    approx: bool = option(False, "also run the approximate modes and report their agreement "
                          "with the whole run (implies --whole-run)")
    approx_step: int = option(4, "K for --step K (default 4)", at_least(1))
    approx_screen: int = option(8, "M for --screen M (default 8)", at_least(1))
    memory_budget: float = option(DEFAULT_MEMORY_BUDGET / 2**30, "GiB the scoring set may use "
                                  "(default 2)", positive)


@dataclass
class ExplainConfig(DataOptions):
    checkpoint: str = option(None, CHECKPOINT_HELP, positional=True)
    out: str = option(None, "output directory for report.html and its files", required=True)
    layers: list[str] = option(None, "conv or hidden linear layers to explain",
                               required=True)
    prune_run: str | None = option(None, "a carprune prune output directory: mark its CAR "
                                   "removal order")
    score_samples: int | None = option(None, "score on the first N val images only (default: "
                                       "all)", positive)
    engine: str = option("fast", "the scoring engine", choices=list(ENGINES))
    top_k: int = option(6, "patches shown per filter (default 6)")


@dataclass
class CompressConfig(DataOptions):
    checkpoint: str = option(None, "checkpoint or run directory, or a shipped name",
                             positional=True)
    out: str = option(None, "output directory for model.carz and sizes.json", required=True)
    weight_sparsity: float = option(0.7, "share of each layer's weights set to zero (default "
                                    "0.7)")
    bits: int = option(5, "2**bits shared values per layer (default 5)")
    layer_sparsity: list[tuple[str, float]] | None = option(
        None, "per-layer exceptions, e.g. conv1=0.5", type=layer_value(float), metavar="LAYER=S")
    layer_bits: list[tuple[str, int]] | None = option(
        None, "per-layer exceptions, e.g. conv1=3", type=layer_value(int), metavar="LAYER=B")
    finetune_epochs: int = option(1, "after weight pruning, and again for the centroids "
                                  "(default 1)")
    prune_rounds: int = option(1, "reach the sparsity in R rounds of pruning and fine-tuning, "
                               "on a cubic ramp (default 1)")
    baseline: str | None = option(None, "unpruned checkpoint for the baseline accuracy "
                                  "(default: the one the run's result.json names)")
    onnx: bool = option(False, "also write model.onnx, checked against PyTorch with "
                        "onnxruntime")


@dataclass
class DemoConfig(DeviceOptions):
    out: str = option("runs/demo", "output directory (a previous demo's is replaced)")
    data_dir: str | None = option(None, "folder with Fashion-MNIST's IDX files")
