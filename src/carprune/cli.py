"""The command line: parses, calls the Python API, prints a table, writes JSON.

argparse (standard library) rather than a third-party CLI package: it gives `--layers conv1
conv2` (nargs) and exit status 2 for usage errors, which is exactly our contract.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from . import io
from .criteria import CRITERIA
from .data import load_data
from .errors import CarpruneError
from .groups import Surgery
from .models import create_model, list_models
from .prune import car_prune, check_layers, count_macs_params, criterion_prune, resolve_keep
from .scoring import DEFAULT_MEMORY_BUDGET, ScoringSet
from .train import evaluate, fit


def table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def command_line() -> str:
    return "carprune " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def check_fits(model: torch.nn.Module, data) -> None:
    """Refuse data whose image shape or class count does not match the model."""
    shape = getattr(model, "carprune_spec", {}).get("input_shape")
    if shape and list(data.input_shape) != list(shape):
        raise CarpruneError(f"the data's images are {list(data.input_shape)} but the model "
                            f"takes {shape}; use the data set the model was trained on")
    with torch.inference_mode():
        out = model.eval()(data.val.tensors[0][:2])
    if out.shape[-1] != data.num_classes:
        raise CarpruneError(f"the model predicts {out.shape[-1]} classes but the data has "
                            f"{data.num_classes}; use the data set the model was trained on")


def refuse_existing_output(out: str) -> None:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CarpruneError(f"output directory {out} already exists and is not empty; choose "
                            "another --out or remove it")


def scoring_subset(data, n: int | None):
    """The first n val images (the val split is shuffled and class-balanced), or all."""
    if n is None:
        return data.val
    if n <= 0:
        raise CarpruneError(f"--score-samples must be positive, got {n}")
    return torch.utils.data.TensorDataset(*[t[:n] for t in data.val.tensors])


# -- commands -----------------------------------------------------------------------------

def cmd_train(args) -> None:
    data = load_data(args.data, args.data_dir)
    c, h, _ = data.input_shape
    kwargs = {"in_channels": c, "num_classes": data.num_classes}
    if args.model == "convnet":
        kwargs["input_size"] = h
    model = create_model(args.model, **kwargs)
    model.carprune_spec = {"arch": {"name": args.model, "kwargs": kwargs},
                           "input_shape": list(data.input_shape), "data": data.describe()}
    refuse_existing_output(args.out)
    start = time.perf_counter()
    log = fit(model, data.train, args.epochs, lr=args.lr, batch_size=args.batch_size,
              seed=args.seed, val=data.val)
    seconds = time.perf_counter() - start
    test = evaluate(model, data.test, data.num_classes)
    val = evaluate(model, data.val, data.num_classes)
    io.save(model, args.out, extra={"training": {
        "command": command_line(), "epochs": log, "seconds": seconds,
        "test_accuracy": test.accuracy, "val_accuracy": val.accuracy,
        "torch": torch.__version__, "threads": torch.get_num_threads()}})
    print(table([[args.model, args.epochs, f"{seconds / max(args.epochs, 1):.1f}",
                  f"{val.accuracy:.4f}", f"{test.accuracy:.4f}"]],
                ["model", "epochs", "s/epoch", "val acc", "test acc"]))
    print(f"checkpoint written to {args.out}")


def cmd_evaluate(args) -> None:
    model = io.load(args.checkpoint)
    data = load_data(args.data, args.data_dir)
    check_fits(model, data)
    result = evaluate(model, getattr(data, args.split), data.num_classes)
    rows = [[name, f"{acc:.4f}"] for name, acc in zip(data.classes, result.per_class,
                                                       strict=True)]
    print(table(rows, ["class", f"{args.split} accuracy"]))
    print(f"{args.split} accuracy: {result.accuracy:.4f} ({result.correct}/{result.total})")
    if args.json:
        io.write_json(args.json, {"checkpoint": str(args.checkpoint), "split": args.split,
                                  "accuracy": result.accuracy, "loss": result.loss,
                                  "per_class": dict(zip(data.classes, result.per_class,
                                                        strict=True))})


def prune_run(checkpoint: str, data, layers: list[str], keep: float, out: str,
              step: int = 1, score_samples: int | None = None, engine: str = "fast",
              memory_budget_gib: float = DEFAULT_MEMORY_BUDGET / 2**30,
              finetune_epochs: int = 2, finetune_lr: float = 0.01, seed: int = 0,
              criterion: str = "car") -> dict:
    """Check everything, prune, fine-tune, write DIR; returns result.json's content."""
    refuse_existing_output(out)
    model = io.load(checkpoint)
    check_fits(model, data)
    check_layers(Surgery(model, data.val.tensors[0][:1]), layers)
    for name in layers:
        resolve_keep(keep, dict(model.named_modules())[name].out_channels, name)
    scoring = scoring_subset(data, score_samples)
    shape = data.input_shape
    macs_before, params_before = count_macs_params(model, shape)
    test_before = evaluate(model, data.test, data.num_classes).accuracy
    val_before = evaluate(model, data.val, data.num_classes).accuracy
    if criterion == "car":
        result = car_prune(model, scoring, layers, keep=keep, step=step, engine=engine,
                           memory_budget=int(memory_budget_gib * 2**30),
                           num_classes=data.num_classes)
    else:
        result = criterion_prune(model, scoring, layers, criterion, keep=keep, seed=seed,
                                 num_classes=data.num_classes)
    pruned = result.model
    test_pruned = evaluate(pruned, data.test, data.num_classes).accuracy
    val_pruned = evaluate(pruned, data.val, data.num_classes).accuracy
    start = time.perf_counter()
    fit(pruned, data.train, finetune_epochs, lr=finetune_lr, seed=seed, desc="fine-tune")
    finetune_seconds = time.perf_counter() - start
    test_finetuned = evaluate(pruned, data.test, data.num_classes).accuracy
    macs_after, params_after = count_macs_params(pruned, shape)
    summary = {
        "command": command_line(), "checkpoint": str(checkpoint), "criterion": criterion,
        "engine": result.engine, "step": step, "keep": keep, "score_samples": len(scoring),
        "seconds": {"prune": result.seconds, "finetune": finetune_seconds},
        "model": {"params_before": params_before, "params_after": params_after,
                  "macs_before": macs_before, "macs_after": macs_after},
        "accuracy": {"test_before": test_before, "test_pruned": test_pruned,
                     "test_finetuned": test_finetuned, "val_before": val_before,
                     "val_pruned": val_pruned},
        "layers": result.to_json(),
    }
    io.save(pruned, out, extra={"pruned_by": summary["command"]})
    io.write_json(Path(out) / "result.json", summary)
    rows = [[name, f"{rec.filters_before} -> {rec.filters_after}",
             " ".join(map(str, rec.removed[:10])) + (" ..." if len(rec.removed) > 10 else "")]
            for name, rec in result.layers.items()]
    print(table(rows, ["layer", "filters", "removed first (original index)"]))
    print(table([["params", params_before, params_after],
                 ["MACs", macs_before, macs_after],
                 ["test accuracy", f"{test_before:.4f}",
                  f"{test_pruned:.4f} pruned / {test_finetuned:.4f} fine-tuned"]],
                ["", "before", "after"]))
    print(f"CAR took {result.seconds:.1f} s ({result.engine} engine), fine-tuning "
          f"{finetune_seconds:.1f} s; written to {out}")
    return summary


def cmd_prune(args) -> None:
    prune_run(args.checkpoint, load_data(args.data, args.data_dir), args.layers, args.keep,
              args.out, step=args.step, score_samples=args.score_samples, engine=args.engine,
              memory_budget_gib=args.memory_budget, finetune_epochs=args.finetune_epochs,
              finetune_lr=args.finetune_lr, seed=args.seed, criterion=args.criterion)


def cmd_bench(args) -> None:
    from . import bench

    model = io.load(args.checkpoint)
    data = load_data(args.data, args.data_dir)
    check_fits(model, data)
    layers = args.layers or Surgery(model, data.val.tensors[0][:1]).conv_layers()
    check_layers(Surgery(model, data.val.tensors[0][:1]), layers)
    scoring = ScoringSet.from_any(scoring_subset(data, args.score_samples), data.num_classes)
    rows, throughput = bench.bench_layers(model, scoring, layers, args.steps)
    run_seconds = overall = None
    if not args.no_whole_run:
        print(f"whole run: every layer to keep {args.keep} with the fast engine ...")
        run_seconds, run_cands = bench.whole_run(model, scoring, layers, args.keep)
        overall = bench.overall_speedup(rows, run_seconds, run_cands)
    report = bench.to_json(rows, throughput, run_seconds, overall, scoring.total, args.steps)
    io.write_json(Path(args.out) / "bench.json", report)
    print(table([[r.layer, r.candidates, f"{r.naive_seconds:.2f}", f"{r.fast_seconds:.2f}",
                  f"{r.speedup:.1f}x", f"{r.bound_seconds:.2f}",
                  f"{r.fast_seconds / r.bound_seconds:.2f}", "yes" if r.identical else "NO"]
                 for r in rows],
                ["layer", "candidates", "naive s", "fast s", "speed-up", "bound s",
                 "fast/bound", "same picks"]))
    print(f"scoring set: {scoring.total} images; network throughput "
          f"{throughput / 1e9:.1f} GMAC/s on {torch.get_num_threads()} threads")
    same = "yes" if report["identical_picks"] else "NO"
    if overall is not None:
        print(f"whole run (every layer to keep {args.keep}, fast engine): {run_seconds:.1f} s")
        print(f"overall speed-up: {overall:.1f}x (identical picks: {same})")
    else:
        print(f"identical picks: {same}")
    print(f"written to {Path(args.out) / 'bench.json'}")
    if not report["identical_picks"]:
        raise CarpruneError("the fast engine chose differently from the naive one; please "
                            "report this with bench.json")


def compare_run(checkpoint: str, data, layers: list[str], criteria_names: list[str], out: str,
                keep_grid: list[float], retrain_epochs: int = 0, seeds: int = 3,
                score_samples: int | None = None) -> dict:
    """Check, run the comparison, write compare.csv, compare.json and one PNG per layer."""
    from . import compare

    model = io.load(checkpoint)
    check_fits(model, data)
    check_layers(Surgery(model, data.val.tensors[0][:1]), layers)
    unknown = [c for c in criteria_names if c not in CRITERIA]
    if unknown:
        raise CarpruneError(f"unknown criterion {unknown[0]!r}; choose from "
                            f"{', '.join(CRITERIA)}")
    if not keep_grid or any(not 0 < k <= 1 for k in keep_grid):
        raise CarpruneError("--keep-grid takes fractions in (0, 1], e.g. 1.0,0.75,0.5,0.25")
    points = compare.compare(model, data, layers, criteria_names, keep_grid,
                             retrain_epochs=retrain_epochs, seeds=seeds,
                             scoring=scoring_subset(data, score_samples))
    sizes = {name: m.out_channels for name, m in model.named_modules() if name in layers}
    summary = {"command": command_line(), "checkpoint": str(checkpoint),
               "keep_0.5": compare.margins(points, 0.5, sizes),
               "keep_0.5_retrained": compare.margins(points, 0.5, sizes, retrained=True)}
    out_dir = Path(out)
    io.atomic_write(out_dir / "compare.csv", compare.to_csv(points))
    for layer in layers:
        compare.plot(points, layer, out_dir / f"compare_{layer}.png")
    io.write_json(out_dir / "compare.json", summary)
    for key, title in (("keep_0.5", "no retraining"),
                       ("keep_0.5_retrained", f"after {retrain_epochs} epoch(s) retraining")):
        if not summary[key]:
            continue
        rows = []
        for layer, m in summary[key].items():
            row = [layer, m["kept"]]
            row += [f"{100 * m['accuracy'][c]:.2f}" if c in m["accuracy"] else "-"
                    for c in criteria_names]
            row.append(f"{100 * m['margin']:+.2f} vs {m['best_other']}"
                       if m["margin"] is not None else "-")
            rows.append(row)
        print(f"test accuracy (%) at keep 0.5, {title}:")
        print(table(rows, ["layer", "kept", *criteria_names, "CAR margin"]))
    print(f"written to {out_dir}/ (compare.csv, compare.json, "
          f"{', '.join(f'compare_{x}.png' for x in layers)})")
    return summary


def cmd_compare(args) -> None:
    refuse_existing_output(args.out)
    compare_run(args.checkpoint, load_data(args.data, args.data_dir), args.layers,
                args.criteria, args.out, args.keep_grid, args.retrain_epochs, args.seeds,
                args.score_samples)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, args.data_dir)


# -- parser -------------------------------------------------------------------------------

def _keep(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use a fraction like 0.5 "
                                         "or a count like 16") from None


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                             f"{kind.__name__} values") from None
    return parse


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist, mnist (with --data-dir) or an image-folder path")
    p.add_argument("--data-dir", default=None,
                   help="folder with the IDX files (default: Debian's path or $CARPRUNE_DATA)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carprune", description="Remove the filters a CNN needs least (CAR: "
        "classification accuracy reduction) and explain the ones it keeps.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a zoo model and write a checkpoint")
    p.add_argument("--model", default="convnet", help=f"one of {', '.join(list_models())}")
    _data_args(p)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy of a checkpoint, overall and per class")
    p.add_argument("checkpoint", help="checkpoint directory or shipped name (convnet-fmnist)")
    _data_args(p)
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("prune", help="greedy CAR filter pruning, then fine-tuning")
    p.add_argument("checkpoint", help="checkpoint directory or shipped name (convnet-fmnist)")
    _data_args(p)
    p.add_argument("--layers", nargs="+", required=True, help="conv layers, pruned in order")
    p.add_argument("--keep", type=_keep, default=0.5,
                   help="per layer: a fraction in (0, 1) or a count of filters (default 0.5)")
    p.add_argument("--criterion", choices=[c for c in CRITERIA if c != "car-oneshot"],
                   default="car", help="car (default) or another criterion to compare with")
    p.add_argument("--step", type=int, default=1,
                   help="filters removed per re-scoring; 1 is exact greedy CAR (default)")
    p.add_argument("--score-samples", type=int, default=None,
                   help="score on the first N val images only (default: all)")
    p.add_argument("--engine", choices=["fast", "naive"], default="fast")
    p.add_argument("--memory-budget", type=float, default=DEFAULT_MEMORY_BUDGET / 2**30,
                   help="GiB the fast engine may use for candidate batches (default 2)")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("compare", help="CAR against the other criteria, one layer at a time")
    p.add_argument("checkpoint")
    _data_args(p)
    p.add_argument("--layers", nargs="+", required=True)
    p.add_argument("--criteria", type=_csv(str), default=CRITERIA,
                   help=f"comma-separated (default: all: {','.join(CRITERIA)})")
    p.add_argument("--keep-grid", type=_csv(float),
                   default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    p.add_argument("--retrain-epochs", type=int, default=0,
                   help="retrain each criterion's keep-0.5 network this many epochs")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds for random and for retraining (spread reported)")
    p.add_argument("--score-samples", type=int, default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="fast against naive CAR: speed-up, lower bound, same picks")
    p.add_argument("checkpoint", nargs="?", default="convnet-fmnist")
    _data_args(p)
    p.add_argument("--layers", nargs="+", default=None, help="default: every conv layer")
    p.add_argument("--steps", type=int, default=3, help="greedy steps per layer (default 3)")
    p.add_argument("--score-samples", type=int, default=None)
    p.add_argument("--keep", type=_keep, default=0.5, help="keep for the whole timed run")
    p.add_argument("--no-whole-run", action="store_true", help="skip the whole timed run")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job on the shipped network (what make demo runs)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except CarpruneError as exc:
        print(f"carprune: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("carprune: interrupted; nothing more was written", file=sys.stderr)
        sys.exit(130)
