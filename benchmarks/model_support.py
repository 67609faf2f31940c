"""The support matrix, measured: for each torchvision and timm network (random weights, 64 px,
a few images labelled by the network's own predictions), the layers Torch-Pruning would prune
against those carprune offers as CAR units, the engine per unit kind, scoring against
physical removal, fast against naive picks, and a save/reload with identical outputs
(docs/models-and-data.md shows the table). A network that fails gets its row with one
sentence saying why. Nothing is downloaded.

    python benchmarks/model_support.py [--quick] [--only NAME ...] [--size 64]
                                       [--out runs/bench/model_support.json]
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

import carprune as cp
from carprune import io
from carprune.commands.common import table
from carprune.groups import LAYERS, Surgery
from carprune.scoring import EngineOptions, FastEngine
from carprune.scoring.removal import removal_gap

TV = "torchvision.models:"
# Torch-Pruning's own tests/test_torchvision_models.py, one per family, plus ShuffleNet
TORCHVISION = ["alexnet", "vgg11_bn", "resnet18", "resnet50", "resnext50_32x4d",
               "wide_resnet50_2", "densenet121", "googlenet", "inception_v3", "squeezenet1_1",
               "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5",
               "mnasnet1_0", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf",
               "regnet_y_400mf", "convnext_tiny", "shufflenet_v2_x0_5"]
# timm's CNN families, small variants: GroupNorm (resnetv2 BiT), LayerNorm2d and channels-last
# LayerNorm (convnext, convnextv2), grouped convs (regnetx, resnext, seresnext), split convs
# (res2net, skresnet, resnest, mixnet), dual-path (dpn), multi-resolution (hrnet),
# conv-attention hybrids (mobilevit, edgenext), and more
TIMM = ["resnetv2_50x1_bit", "convnext_atto", "convnextv2_atto", "regnetx_002", "resnext26ts",
        "seresnext26d_32x4d", "res2net50_14w_8s", "skresnet18", "resnest14d", "mixnet_s",
        "dpn68", "hrnet_w18_small", "mobilevit_xxs", "edgenext_xx_small", "efficientnet_b0",
        "mobilenetv3_large_100", "ghostnet_100", "rexnet_100", "dla34", "cspresnet50",
        "ese_vovnet19b_dw", "lcnet_050", "densenet121"]
NETWORKS = [TV + n for n in TORCHVISION] + ["timm:" + n for n in TIMM]
# every unit kind: plain, branch and concat (squeezenet), residual (resnet18), depthwise and
# linear (mobilenet_v3_small), grouped (regnetx_002), norm-mixed and linear (convnext_atto)
QUICK = [TV + "squeezenet1_1", TV + "resnet18", TV + "mobilenet_v3_small", "timm:regnetx_002",
         "timm:convnext_atto"]
# what a network needs to run on its own (no auxiliary heads) and its minimum input size
KWARGS = {TV + "googlenet": {"aux_logits": False, "init_weights": True},
          TV + "inception_v3": {"aux_logits": False, "init_weights": True}}
MIN_SIZE = {TV + "inception_v3": 75}
IMAGES = 4
TOLERANCE = 1e-5
LIMIT = 420  # seconds a network may take before its row says so and the next one starts


class Overtime(Exception):
    """A network took longer than its time limit."""


def label(name: str) -> str:
    """torchvision networks by their own name, timm's as timm:NAME."""
    return name.removeprefix(TV)


def network(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    """The network with random weights (seed 0), ready to save, and `IMAGES` images."""
    torch.manual_seed(0)
    kwargs = KWARGS.get(name, {})
    model = cp.create_model(name, **kwargs).eval()
    model.carprune_spec = {"arch": {"name": name, "kwargs": kwargs},
                           "input_shape": [3, size, size]}
    return model, torch.randn(IMAGES, 3, size, size, generator=torch.Generator().manual_seed(1))


def outputs(surgery: Surgery) -> list[nn.Module]:
    """The classifier: the last nn.Linear, and every conv or linear layer no layer reads."""
    layers = [m for m in surgery.model.modules() if isinstance(m, LAYERS)]
    last = [m for m in layers if isinstance(m, nn.Linear)][-1:]
    return last + [m for m in layers if m in surgery.dg.module2node and m not in last
                   and not surgery.consumers(surgery.names[m], 0)]


def tp_layers(surgery: Surgery) -> dict[str, set[str]]:
    """What Torch-Pruning itself prunes: each group's root (a conv or hidden linear), with the
    conv and linear layers whose output channels the group removes."""
    groups = surgery.dg.get_all_groups(ignored_layers=outputs(surgery))
    found = {}
    for group in groups:
        root = group[0].dep.target.module
        if isinstance(root, LAYERS):
            found[surgery.names[root]] = {
                surgery.names[dep.target.module] for dep, _ in group
                if isinstance(dep.target.module, LAYERS)
                and surgery.dg.is_out_channel_pruning_fn(dep.handler)}
    return found


def coverage(surgery: Surgery, car: Sequence[str]) -> dict:
    """TP's layers and CAR's; a TP layer is covered when CAR offers it, or another layer whose
    units are the same group (a depthwise root's producer); the others with `why_not`."""
    tp = tp_layers(surgery)
    refused = {root: surgery.why_not(root) for root, members in tp.items()
               if root not in car and not members & set(car)}
    return {"tp_layers": sorted(tp), "car_layers": list(car), "refused": refused}


def engines(surgery: Surgery, car: Sequence[str]) -> dict[str, list[int]]:
    """Per unit kind: [layers the fast engine plans, layers it leaves to the naive one]."""
    engine, kinds = FastEngine(), {}
    for layer in car:
        counts = kinds.setdefault(surgery.kind(layer), [0, 0])
        counts[engine.plan(surgery, layer) is None] += 1
    return kinds


def sampled(surgery: Surgery, car: Sequence[str]) -> list[str]:
    """The first and the middle layer, and the first layer of each unit kind."""
    chosen = [car[0], car[len(car) // 2]]
    for layer in car:
        if surgery.kind(layer) not in {surgery.kind(n) for n in chosen}:
            chosen.append(layer)
    return list(dict.fromkeys(chosen))


def removal(model: nn.Module, surgery: Surgery, layers: Sequence[str], x: torch.Tensor) -> dict:
    """The largest gaps between the fast engine's scores and physical removal of unit 1 (or 0)
    over `layers`, and whether every image's correctness agrees."""
    gaps = [removal_gap(model, n, min(1, surgery.size(n) - 1), x) for n in layers]
    return {"sampled": list(layers), "logit_gap": max(g.logits for g in gaps),
            "loss_gap": max(g.loss for g in gaps), "correct": all(g.correct for g in gaps)}


def picks(model: nn.Module, data: TensorDataset, surgery: Surgery, layers: Sequence[str]
          ) -> tuple[dict, list[nn.Module]]:
    """One CAR removal in each layer with the naive and the fast engine: the units each
    removed (original numbering), and the fast engine's pruned networks."""
    removed, pruned = {}, []
    for layer in layers:
        runs = [cp.car_prune(model, data, [layer], keep=surgery.size(layer) - 1,
                             engine=EngineOptions(e), progress=False) for e in ("naive", "fast")]
        removed[layer] = [r.layers[layer].removed for r in runs]
        pruned.append(runs[1].model)
    return {"picks": removed, "fast_is_naive": all(a == b for a, b in removed.values())}, pruned


def reloads(pruned: Sequence[nn.Module], x: torch.Tensor) -> dict:
    """Each pruned network saved with cp.save and built again by cp.load: identical outputs."""
    same = []
    for model in pruned:
        with tempfile.TemporaryDirectory() as tmp:
            cp.save(model, tmp)
            again = cp.load(tmp)
        with torch.inference_mode():
            same.append(torch.equal(model(x), again(x)))
    return {"reload_identical": all(same)}


def sentence(exc: BaseException) -> str:
    """The failure in one sentence: a CarpruneError's message, else "<ExcType>: message"
    trimmed."""
    if isinstance(exc, cp.CarpruneError):
        return " ".join(str(exc).split())
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 160 else text[:157] + "..."


def attempt(row: dict, stage: str, fn: Callable[[], dict]) -> bool:
    """Run one stage into `row`; a failure is the row's reason (the first one), not the end."""
    try:
        row.update(fn())
        return True
    except Overtime:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is a row's sentence, never the end
        row.setdefault("error", f"{stage}: {sentence(exc)}")
        return False


def check(name: str, size: int = 64, limit: int = LIMIT) -> dict:
    """One network's row of the matrix (see the module docstring)."""
    started = time.perf_counter()
    size = max(size, MIN_SIZE.get(name, size))
    row: dict = {"network": label(name), "size": size}
    state: dict = {}

    def build() -> dict:
        model, x = network(name, size)
        with torch.inference_mode():
            y = model(x).argmax(1)
        surgery = Surgery(model, x[:1])
        state.update(model=model, x=x, data=TensorDataset(x, y), surgery=surgery,
                     car=surgery.prunable_layers())
        if not state["car"]:
            first = next(n for n, m in surgery.modules.items() if isinstance(m, LAYERS))
            raise cp.CarpruneError(f"carprune offers no prunable layer ({first} "
                                   f"{surgery.why_not(first)})")
        return {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: often one class; timm's notices
        try:
            _stages(row, state, build, limit)
        except Overtime:
            row.setdefault("error", f"took over {limit} s (the time limit, --limit); not "
                                    "measured further")
    row["seconds"] = round(time.perf_counter() - started, 1)
    row["result"] = verdict(row)
    row["passed"] = row["result"] == "pass"
    return row


def _stages(row: dict, state: dict, build: Callable[[], dict], limit: int) -> None:
    """Build, then every measurement, within `limit` seconds (SIGALRM raises Overtime)."""
    def overtime(signum, frame):
        raise Overtime

    previous = signal.signal(signal.SIGALRM, overtime)
    signal.alarm(limit)
    try:
        if attempt(row, "build", build):
            s, car, x = state["surgery"], state["car"], state["x"]
            attempt(row, "units", lambda: coverage(s, car))
            attempt(row, "engines", lambda: {"engines": engines(s, car)})
            attempt(row, "removal", lambda: removal(state["model"], s, sampled(s, car), x))
            chosen = list(dict.fromkeys([car[0], car[len(car) // 2]]))
            if attempt(row, "picks", lambda: _picked(state, chosen)):
                attempt(row, "reload", lambda: reloads(state["pruned"], x))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _picked(state: dict, layers: Sequence[str]) -> dict:
    found, state["pruned"] = picks(state["model"], state["data"], state["surgery"], layers)
    return found


def verdict(row: dict) -> str:
    """"pass" when every target is met (CAR offers every TP layer, scoring = removal, fast =
    naive, reload identical), else one sentence: the first failure, or the first target
    missed."""
    if "error" in row:
        return row["error"]
    gap = max(row["logit_gap"], row["loss_gap"])
    first = next(iter(row["refused"].items()), ("", ""))
    missed = [(row["refused"], f"CAR refuses {len(row['refused'])} of Torch-Pruning's layers "
                               f"({first[0]} {first[1]})"),
              (gap >= TOLERANCE, f"scoring differs from removal by {gap:.1e} (relative)"),
              (not row["correct"], "scoring and removal disagree on an image's correctness"),
              (not row["fast_is_naive"], "the fast and the naive engine pick different units"),
              (not row["reload_identical"], "the reloaded network computes other outputs")]
    return next((why for failed, why in missed if failed), "pass")


def cells(row: dict) -> list:
    """The row as the table prints it."""
    def yes(key: str) -> str:
        return "-" if key not in row else "yes" if row[key] else "NO"

    tp, car = row.get("tp_layers"), row.get("car_layers")
    kinds = ", ".join(f"{k} {n[0]}/{sum(n)}" for k, n in sorted(row.get("engines", {}).items()))
    gap = "-" if "logit_gap" not in row else \
        f"{max(row['logit_gap'], row['loss_gap']):.0e}" + ("" if row["correct"] else " (NO)")
    refused = "" if not row.get("refused") else f" ({len(row['refused'])} refused)"
    return [row["network"], row["size"], "-" if tp is None else len(tp),
            "-" if car is None else f"{len(car)}{refused}", kinds or "-", gap,
            yes("fast_is_naive"), yes("reload_identical"), row["seconds"],
            row["result"]]


HEADER = ["network", "px", "TP layers", "CAR layers", "fast/all layers per kind",
          "scoring-removal", "fast=naive", "reload", "s", "result"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few networks that cover every unit kind")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these networks only")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=LIMIT,
                        help="seconds a network may take (default %(default)s)")
    parser.add_argument("--out", default="runs/bench/model_support.json")
    args = parser.parse_args(argv)
    names = QUICK if args.quick else NETWORKS
    if args.only:
        names = [n for n in NETWORKS if n in args.only or label(n) in args.only]
        if not names:
            parser.error(f"no network named {' '.join(args.only)}; choose from "
                         f"{', '.join(map(label, NETWORKS))}")
    started, rows = time.perf_counter(), []
    for i, name in enumerate(names, 1):
        rows.append(check(name, args.size, args.limit))
        print(f"[{i}/{len(names)}] {rows[-1]['network']}: {rows[-1]['result']} "
              f"({rows[-1]['seconds']} s)", flush=True)
    minutes = (time.perf_counter() - started) / 60
    print(table([cells(r) for r in rows], HEADER))
    for r in rows:
        for layer, why in r.get("refused", {}).items():
            print(f"{r['network']}: Torch-Pruning prunes {layer}, CAR refuses: it {why}")
    print(f"{sum(r['passed'] for r in rows)}/{len(rows)} networks pass; {minutes:.1f} min")
    io.write_json(args.out, {"size": args.size, "minutes": round(minutes, 2), "networks": rows})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
