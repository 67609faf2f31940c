"""What each command does, end to end: check the input, call the API, print a table, write
the outputs. The CLI (`cli.py`) only parses; notebooks and the demo call these directly."""

from __future__ import annotations

import copy
import dataclasses
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import dist, io
from .criteria import CRITERIA
from .data import check_fits, load_data
from .errors import CarpruneError
from .groups import Surgery
from .measure import speed_report
from .models import create_model
from .prune import car_prune, check_layers, criterion_prune, global_car_prune, resolve_keep
from .resume import RunState
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


def refuse_existing_output(out: str) -> None:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CarpruneError(f"output directory {out} already exists and is not empty; choose "
                            "another --out or remove it")


def first_images(dataset, n: int | None, option: str):
    """The first n images of a split (our splits are in random order, val class-balanced), or
    all of them; `option` names the flag in the error."""
    if n is None:
        return dataset
    if n <= 0:
        raise CarpruneError(f"{option} must be positive, got {n}")
    return torch.utils.data.TensorDataset(*[t[:n] for t in dataset.tensors])


# -- commands -----------------------------------------------------------------------------

def model_labels(model: torch.nn.Module, dataset):
    """The same images labelled by the model's own predictions (CAR as loss of agreement)."""
    with torch.inference_mode():
        x = dataset.tensors[0]
        preds = torch.cat([model.eval()(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return torch.utils.data.TensorDataset(x, preds)


def relabelled(data, model: torch.nn.Module):
    """Every split labelled by the model's predictions: accuracies then read as agreement with
    the unpruned network, and fine-tuning distils toward it."""
    with torch.inference_mode():
        classes = model.eval()(data.val.tensors[0][:1]).shape[-1]
    return dataclasses.replace(
        data, train=model_labels(model, data.train), val=model_labels(model, data.val),
        test=model_labels(model, data.test), classes=[str(c) for c in range(classes)],
        meta={**data.meta, "unlabelled": False, "labels": "model"})


def train_run(args) -> None:
    """`carprune train`: fit a zoo model and write a checkpoint with the command that made it."""
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


def evaluate_run(args) -> None:
    """`carprune evaluate`: overall and per-class accuracy of a checkpoint."""
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


def prune_run(checkpoint, data, layers: list[str] | None, keep: float, out: str,
              step: int = 1, screen: int | None = None, score_samples: int | None = None,
              engine: str = "fast",
              memory_budget_gib: float = DEFAULT_MEMORY_BUDGET / 2**30,
              finetune_epochs: int = 2, finetune_lr: float = 0.01, seed: int = 0,
              criterion: str = "car", train_samples: int | None = None,
              restart: bool = False, target: float | None = None, budget: str = "macs",
              cost: str | None = None,
              min_keep: float = 0.1, ignore: list[str] | None = None,
              labels: str = "data", round_to: int = 1, compensate: bool = False) -> dict:
    """Check everything, prune, fine-tune, write DIR; returns result.json's content.

    checkpoint: a checkpoint directory, a shipped name, or a model (e.g. from a factory).
    target, budget, cost, round_to: global CAR over `layers` (default: every prunable conv)
    to `target` of `budget` (see global_car_prune); without a target, each of `layers` is
    pruned to `keep`.
    labels: "data", or "model" to score against the unpruned network's own predictions.
    compensate: CAR scores and removes with consumers refit by least squares (compensation.py).
    State is kept in DIR after every CAR step and fine-tuning epoch: the same call on the same
    DIR resumes an interrupted run (see resume.py)."""
    model = checkpoint if isinstance(checkpoint, torch.nn.Module) else io.load(checkpoint)
    source = "a model given in Python" if isinstance(checkpoint, torch.nn.Module) \
        else str(checkpoint)
    check_fits(model, data)
    surgery = Surgery(copy.deepcopy(model), data.val.tensors[0][:1])
    if target is None:
        if not layers:
            raise CarpruneError("name the layers to prune with --layers, or give --target-macs, "
                                "--target-params or --target-latency-ms for a global run")
        check_layers(surgery, layers)
        for name in layers:
            resolve_keep(keep, surgery.size(name), name)
        if round_to != 1:
            raise CarpruneError("--round-to applies to global runs (--target-macs, "
                                "--target-params or --target-latency-ms); per layer, give "
                                "--keep as a count of filters")
    elif layers:
        check_layers(surgery, layers)
    if compensate and criterion != "car":
        raise CarpruneError(f"--compensate refits layers for CAR; it does not apply to "
                            f"--criterion {criterion}, drop one of the two")
    if labels not in ("data", "model"):
        raise CarpruneError(f"--labels takes data or model, got {labels!r}")
    if data.meta.get("unlabelled"):
        if labels != "model":
            raise CarpruneError("the image folder has no class folders, so its images have no "
                                "labels; add --labels model to score (and fine-tune) against "
                                "the unpruned network's own predictions")
        data = relabelled(data, model)
    scoring = first_images(data.val, score_samples, "--score-samples")
    if labels == "model":
        scoring = model_labels(model, scoring)
    train = first_images(data.train, train_samples, "--train-samples")
    config = {"checkpoint": source, "weights": model.carprune_spec.get("weights_sha256"),
              "data": data.name, "val_images": len(data.val), "layers": list(layers or []),
              "keep": keep, "step": step, "screen": screen, "score_samples": len(scoring),
              "engine": engine,
              "criterion": criterion, "finetune_epochs": finetune_epochs,
              "finetune_lr": finetune_lr, "train_samples": len(train), "seed": seed,
              "target": target, "budget": budget, "cost": cost, "min_keep": min_keep,
              "ignore": ignore or [], "round_to": round_to, "compensate": compensate,
              "labels": labels}
    state = RunState.open(out, config, restart)
    shape = data.input_shape
    before = speed_report(model, shape)
    test_before = evaluate(model, data.test, data.num_classes).accuracy
    val_before = evaluate(model, data.val, data.num_classes).accuracy
    global_steps = None
    if target is not None:
        result, global_steps = global_car_prune(
            model, scoring, target, layers=layers, budget=budget, cost=cost,
            min_keep=min_keep, step=step, screen=screen, round_to=round_to,
            compensate=compensate, ignore=ignore or (), engine=engine,
            memory_budget=int(memory_budget_gib * 2**30), num_classes=data.num_classes)
    elif criterion == "car":
        result = car_prune(model, scoring, layers, keep=keep, step=step, screen=screen,
                           compensate=compensate, engine=engine,
                           memory_budget=int(memory_budget_gib * 2**30),
                           num_classes=data.num_classes, done=state.layers(),
                           val_before=state.saved.get("val_before"), on_step=state.save_layers)
    else:
        result = criterion_prune(model, scoring, layers, criterion, keep=keep, seed=seed,
                                 num_classes=data.num_classes)
    pruned = result.model
    test_pruned = evaluate(pruned, data.test, data.num_classes).accuracy
    val_pruned = evaluate(pruned, data.val, data.num_classes).accuracy
    val_by_original = model_labels(model, data.val)  # agreement = accuracy on these labels
    agree_pruned = evaluate(pruned, val_by_original).accuracy
    start = time.perf_counter()
    fit(pruned, train, finetune_epochs, lr=finetune_lr, seed=seed, desc="fine-tune",
        resume=state.training(pruned),
        on_epoch=lambda ts: state.save_training(pruned, ts))
    finetune_seconds = time.perf_counter() - start
    test_finetuned = evaluate(pruned, data.test, data.num_classes).accuracy
    after = speed_report(pruned, shape)
    summary = {
        "command": command_line(), "checkpoint": str(checkpoint), "criterion": criterion,
        "engine": result.engine, "step": step, "screen": screen, "keep": keep,
        "compensate": compensate,
        "score_samples": len(scoring),
        "seconds": {"prune": result.seconds, "finetune": finetune_seconds},
        "model": {"params_before": before["params"], "params_after": after["params"],
                  "macs_before": before["macs"], "macs_after": after["macs"],
                  "latency_ms_before": {"batch1": before["latency_ms_batch1"],
                                        "batch64": before["latency_ms_batch64"]},
                  "latency_ms_after": {"batch1": after["latency_ms_batch1"],
                                       "batch64": after["latency_ms_batch64"]},
                  "threads": after["threads"]},
        "accuracy": {"test_before": test_before, "test_pruned": test_pruned,
                     "test_finetuned": test_finetuned, "val_before": val_before,
                     "val_pruned": val_pruned},
        "layers": result.to_json(),
    }
    if global_steps is not None:
        summary["global"] = {"target": target, "budget": budget, "cost": cost or budget,
                             "min_keep": min_keep, "round_to": round_to,
                             "steps": [asdict(st) for st in global_steps]}
    summary["accuracy"]["val_agreement_pruned"] = agree_pruned
    summary["accuracy"]["val_agreement_finetuned"] = evaluate(pruned, val_by_original).accuracy
    state.finish()
    if not dist.is_main():
        return summary
    io.save(pruned, out, extra={"pruned_by": summary["command"]})
    if global_steps is not None:
        io.atomic_write(Path(out) / "filters_kept.png", filters_kept_png(result, global_steps))
    io.write_json(Path(out) / "result.json", summary)
    rows = [[name, f"{rec.filters_before} -> {rec.filters_after}",
             " ".join(map(str, rec.removed[:10])) + (" ..." if len(rec.removed) > 10 else "")]
            for name, rec in result.layers.items()]
    print(table(rows, ["layer", "filters", "removed first (original index)"]))
    print(table([["params", before["params"], after["params"]],
                 ["MACs", before["macs"], after["macs"]],
                 ["latency ms (batch 1 / 64)",
                  f"{before['latency_ms_batch1']:.2f} / {before['latency_ms_batch64']:.1f}",
                  f"{after['latency_ms_batch1']:.2f} / {after['latency_ms_batch64']:.1f}"],
                 ["test accuracy", f"{test_before:.4f}",
                  f"{test_pruned:.4f} pruned / {test_finetuned:.4f} fine-tuned"],
                 ["val agreement with the original", "1.0000",
                  f"{agree_pruned:.4f} pruned / "
                  f"{summary['accuracy']['val_agreement_finetuned']:.4f} fine-tuned"]],
                ["", "before", "after"]))
    print(f"CAR took {result.seconds:.1f} s ({result.engine} engine), fine-tuning "
          f"{finetune_seconds:.1f} s; written to {out}")
    return summary


def filters_kept_png(result, steps) -> bytes:
    """Global CAR's order across layers: each layer's share of filters kept against the
    budget left, one line per layer."""
    from matplotlib.figure import Figure

    from .interpret.pictures import png

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name, rec in result.layers.items():
        kept, xs, ys = rec.filters_before, [100.0], [100.0]
        for st in steps:
            if st.layer == name:
                kept -= len(st.removed)
                xs.append(100 * st.remaining)
                ys.append(100 * kept / rec.filters_before)
        xs.append(100 * steps[-1].remaining if steps else 100.0)
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", label=f"{name} ({rec.filters_before} -> "
                f"{rec.filters_after})")
    ax.invert_xaxis()
    ax.set_xlabel("budget left (% of the original)")
    ax.set_ylabel("filters kept (% of the layer)")
    ax.set_title("global CAR: which layers give up filters as the budget shrinks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig, dpi=110)


def bench_run(args) -> None:
    """`carprune bench`: fast against naive engine, speed-ups and bounds, bench.json."""
    from . import bench

    model = io.load(args.checkpoint)
    data = load_data(args.data, args.data_dir)
    check_fits(model, data)
    layers = args.layers or Surgery(model, data.val.tensors[0][:1]).conv_layers()
    check_layers(Surgery(model, data.val.tensors[0][:1]), layers)
    scoring = ScoringSet.from_any(first_images(data.val, args.score_samples, "--score-samples"),
                                  data.num_classes)
    rows, throughput = bench.bench_layers(model, scoring, layers, args.steps)
    run_seconds = approximate = None
    if args.whole_run or args.approx:
        print(f"whole run: every layer to keep {args.keep} with the fast engine ...")
        exact, candidates = bench.whole_run(model, scoring, layers, args.keep)
        run_seconds = exact.seconds
        if args.approx:
            approximate = bench.approximations(model, scoring, data.test, exact, layers,
                                               args.keep, args.approx_step, args.approx_screen)
    else:
        candidates = bench.run_candidates(model, layers, args.keep)
    overall = bench.overall_speedup(rows, candidates, run_seconds)
    report = bench.to_json(rows, throughput, run_seconds, overall, scoring.total, args.steps,
                           approximate)
    io.write_json(Path(args.out) / "bench.json", report)
    print(table([[r.layer, r.candidates, f"{r.naive_seconds:.2f}", f"{r.fast_seconds:.2f}",
                  f"{r.speedup:.1f}x", f"{r.bound_seconds:.2f}",
                  f"{r.fast_seconds / r.bound_seconds:.2f}", "yes" if r.identical else "NO"]
                 for r in rows],
                ["layer", "candidates", "naive s", "fast s", "speed-up", "bound s",
                 "fast/bound", "same picks"]))
    print(f"scoring set: {scoring.total} images; network throughput "
          f"{throughput / 1e9:.1f} GMAC/s on {torch.get_num_threads()} threads")
    if approximate:
        print("approximate modes against the exact whole run:")
        print(table([[a["mode"], f"{a['seconds']:.1f}", f"{a['speedup']:.1f}x",
                      f"{a['identical_picks']:.0%}", f"{100 * a['val_diff']:+.2f}",
                      f"{100 * a['test_diff']:+.2f}"] for a in approximate],
                    ["mode", "seconds", "faster", "same picks", "val acc diff (points)",
                     "test acc diff (points)"]))
    same = "yes" if report["identical_picks"] else "NO"
    if run_seconds is not None:
        print(f"whole run (every layer to keep {args.keep}, fast engine): {run_seconds:.1f} s")
    else:
        print(f"overall: a keep-{args.keep} run's {sum(candidates.values())} candidates at the "
              "per-candidate times above (--whole-run measures the fast side end to end)")
    print(f"overall speed-up: {overall:.1f}x (identical picks: {same})")
    print(f"written to {Path(args.out) / 'bench.json'}")
    if not report["identical_picks"]:
        raise CarpruneError("the fast engine chose differently from the naive one; please "
                            "report this with bench.json")


def compare_run(checkpoint: str, data, layers: list[str], criteria_names: list[str], out: str,
                keep_grid: list[float], retrain_epochs: int = 0, seeds: int = 3,
                score_samples: int | None = None, train_samples: int | None = None,
                known: dict | None = None) -> dict:
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
    train = first_images(data.train, train_samples, "--train-samples")
    points = compare.compare(model, data, layers, criteria_names, keep_grid,
                             retrain_epochs=retrain_epochs, seeds=seeds,
                             scoring=first_images(data.val, score_samples, "--score-samples"),
                             train=train, known=known)
    sizes = {name: m.out_channels for name, m in model.named_modules() if name in layers}
    summary = {"command": command_line(), "checkpoint": str(checkpoint),
               "retrain": {"epochs": retrain_epochs, "seeds": seeds,
                           "train_images": len(train)},
               "keep_0.5": compare.margins(points, 0.5, sizes),
               "keep_0.5_retrained": compare.margins(points, 0.5, sizes, retrained=True),
               "car_minus_oneshot": compare.oneshot_gaps(points)}
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
            for c in criteria_names:
                low, high = m["spread"].get(c, (0, 0))
                row.append("-" if c not in m["accuracy"] else f"{100 * m['accuracy'][c]:.2f}"
                           + (f"±{50 * (high - low):.2f}" if high > low else ""))
            row.append(f"{100 * m['margin']:+.2f} vs {m['best_other']}"
                       if m["margin"] is not None else "-")
            rows.append(row)
        print(f"test accuracy (%) at keep 0.5, {title} (± half the range over seeds):")
        print(table(rows, ["layer", "kept", *criteria_names, "CAR margin"]))
    for layer, gaps in summary["car_minus_oneshot"].items():
        print(f"{layer}: car minus car-oneshot, test points, per filters kept: "
              + ", ".join(f"{kept}: {100 * gap:+.2f}" for kept, gap in sorted(gaps.items()))
              + f" (smallest {100 * min(gaps.values()):+.2f})")
    print(f"written to {out_dir}/ (compare.csv, compare.json, "
          f"{', '.join(f'compare_{x}.png' for x in layers)})")
    return summary
