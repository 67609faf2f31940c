"""`carprune prune`: check everything, prune (per layer or global CAR, or another criterion),
fine-tune, write the run directory; resumable after a kill (see resume.py)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import dist, io
from ..car import Resume, car_prune, check_layers, global_car_prune, resolve_keep
from ..classes import ClassSubset, data_for, labels_of, output_names, outputs_of, trim_head
from ..config import PruneConfig
from ..criteria import criterion_prune
from ..data import check_fits, first_images
from ..devices import device_of, resolve_device
from ..errors import CarpruneError
from ..groups import Surgery
from ..measure import speed_report
from ..resume import RunState
from ..train import Recipe, evaluate, fit
from .common import (
    command_line,
    held_in_memory,
    model_labels,
    open_data,
    open_model,
    relabelled,
    table,
)

NOT_IDENTITY = ("out", "restart", "memory_budget", "workers", "data_dir", "trust_pickle")


def run(config: PruneConfig, data=None, model: nn.Module | None = None) -> dict:
    """The whole command; `data` (a carprune Data) and `model` replace --data and the
    checkpoint when given from Python. Returns result.json's content."""
    device = resolve_device(config.device)
    model, source = open_model(config, model)
    data = data_for(model, open_data(config, model, data))
    model.to(device)
    check_fits(model, data)
    _check_layers(config, model, data)
    model, data, scoring, train, subset = _inputs(config, data, model, device)
    state = RunState.open(config.out, _identity(config, model, data, scoring, train, source,
                                                subset), config.restart)
    before = _measure(model, data)
    # agreement = accuracy on the original's predictions; relabelled data already holds them
    by_original = data.val if _by_model(data) else model_labels(model, data.val, data)
    result, global_steps = _prune(config, model, scoring, state)
    pruned = result.model
    after = _measure(pruned, data, by_original)
    start = time.perf_counter()
    recipe = Recipe(lr=config.finetune_lr, seed=config.seed, shift_and_flip=data.augment,
                    workers=data.workers, teacher=model if config.distill else None)
    fit(pruned, train, config.finetune_epochs, recipe, desc="fine-tune",
        resume=state.training(pruned), on_epoch=lambda ts: state.save_training(pruned, ts))
    finetune_seconds = time.perf_counter() - start
    finetuned = _measure(pruned, data, by_original, speed=True, splits=("test",))
    summary = _summary(config, source, result, global_steps, before, after, finetuned,
                       finetune_seconds, scoring.total)
    if subset is not None:
        summary["classes"] = _classes(subset, pruned, result, summary["accuracy"])
    if dist.is_main():
        _write(pruned, result, global_steps, summary)
        state.finish()  # only now: a run stopped while writing resumes, rather than refuses
        _print(result, summary)
    return summary


def _check_layers(config: PruneConfig, model: nn.Module, data) -> None:
    """The layers exist and are prunable, and a per-layer --keep leaves each of them some."""
    surgery = Surgery(model, data.example(1).to(device_of(model)))
    if config.layers:
        check_layers(surgery, config.layers)
    if config.budget[1] is None:
        for name in config.layers:
            resolve_keep(config.keep, surgery.size(name), name)


def _inputs(config: PruneConfig, data, model: nn.Module, device: torch.device):
    """(network, data, scoring set held on the device, training set, class subset), relabelled
    by the model under --labels model; with --classes, the network specialised and every split
    restricted to the subset's images (under --labels model, the scoring set to the images the
    unpruned network puts in the subset), before --score-samples and --train-samples count."""
    if data.meta.get("unlabelled"):
        if config.labels != "model":
            raise CarpruneError("the image folder has no class folders, so its images have no "
                                "labels; add --labels model to score (and fine-tune) against "
                                "the unpruned network's own predictions")
        data = relabelled(data, model)
    scoring = data.val if config.classes else \
        first_images(data.val, config.score_samples, "--score-samples")
    if config.labels == "model" and not _by_model(data):
        scoring = model_labels(model, scoring, data)
    subset = None
    if config.classes:
        example = data.example(1).to(device_of(model))
        subset = ClassSubset.resolve(config.classes, output_names(model, data.classes),
                                     outputs_of(model, example))
        scoring = first_images(subset.dataset(scoring), config.score_samples,
                               "--score-samples")
        subset.check_present(torch.bincount(labels_of(scoring), minlength=len(subset.indices)),
                             "the scoring set")
        model, data = trim_head(model, subset, example), subset.data(data)
    train = first_images(data.train, config.train_samples, "--train-samples")
    return (model, data, held_in_memory(data, scoring, config.memory_budget, device), train,
            subset)


def _by_model(data) -> bool:
    """Every split is already labelled by the unpruned model (`relabelled`)."""
    return data.meta.get("labels") == "model"


def _identity(config: PruneConfig, model: nn.Module, data, scoring, train, source,
              subset: ClassSubset | None) -> dict:
    """What a resumed run must share with the interrupted one: the options that decide the
    result, and the weights, images and classes they were applied to."""
    options = {k: v for k, v in config.to_json().items() if k not in NOT_IDENTITY}
    return {**options, "source": source,
            "weights": model.carprune_spec.get("weights_sha256"), "data": data.name,
            "val_images": len(data.val), "score_images": scoring.total,
            "train_images": len(train),
            "class_subset": None if subset is None else subset.to_json()}


def _measure(model: nn.Module, data, by_original=None, speed: bool = False,
             splits: tuple[str, ...] = ("test", "val")) -> dict:
    """Accuracy on `splits`; agreement on val with the original's predictions `by_original`;
    params, MACs and latency for the unpruned network and after fine-tuning."""
    figures = {split: evaluate(model, getattr(data, split), data.num_classes,
                               workers=data.workers).accuracy for split in splits}
    if by_original is not None:
        figures["agreement"] = evaluate(model, by_original, workers=data.workers).accuracy
    if by_original is None or speed:
        figures["speed"] = speed_report(model, data.input_shape)
    return figures


def _prune(config: PruneConfig, model: nn.Module, scoring, state: RunState):
    """The pruning itself: global CAR under a budget, per-layer CAR, or another criterion."""
    target = config.budget[1]
    if target is not None:
        resume = Resume(state.global_progress(),
                        on_step=lambda progress, pruned: state.save_global(progress))
        return global_car_prune(model, scoring, target, config.layers, config.budget_settings(),
                                config.approximation(), config.engine_options(), resume=resume)
    if config.criterion == "car":
        resume = Resume(state.layers(), state.saved.get("val_before"), state.save_layers)
        return car_prune(model, scoring, config.layers, config.keep, config.approximation(),
                         config.engine_options(), resume=resume), None
    return criterion_prune(model, scoring, config.layers, config.criterion, keep=config.keep,
                           seed=config.seed), None


def _summary(config: PruneConfig, source: str, result, global_steps, before: dict,
             after: dict, finetuned: dict, finetune_seconds: float, score_images: int) -> dict:
    """result.json: the command and its config, sizes, speeds and accuracies, every step."""
    b, a = before["speed"], finetuned["speed"]
    summary = {
        "command": command_line(), "config": config.to_json(), "checkpoint": source,
        "criterion": config.criterion, "engine": result.engine, "step": config.step,
        "screen": config.screen, "shortlist": config.shortlist, "race": config.race,
        "keep": config.keep,
        "compensate": config.compensate,
        "score_samples": score_images,
        "seconds": {"prune": result.seconds, "finetune": finetune_seconds},
        "model": {"params_before": b["params"], "params_after": a["params"],
                  "macs_before": b["macs"], "macs_after": a["macs"],
                  "latency_ms_before": {"batch1": b["latency_ms_batch1"],
                                        "batch64": b["latency_ms_batch64"]},
                  "latency_ms_after": {"batch1": a["latency_ms_batch1"],
                                       "batch64": a["latency_ms_batch64"]},
                  "threads": a["threads"]},
        "accuracy": {"test_before": before["test"], "test_pruned": after["test"],
                     "test_finetuned": finetuned["test"], "val_before": before["val"],
                     "val_pruned": after["val"],
                     "val_agreement_pruned": after["agreement"],
                     "val_agreement_finetuned": finetuned["agreement"]},
        "layers": result.to_json(),
    }
    if global_steps is not None:
        budget, target = config.budget
        summary["global"] = {"target": target, "budget": budget, "cost": config.cost or budget,
                             "min_keep": config.min_keep, "round_to": config.round_to,
                             "steps": [asdict(st) for st in global_steps]}
    return summary


def _classes(subset: ClassSubset, pruned: nn.Module, result, accuracy: dict) -> dict:
    """What specialisation kept and what it cost: the classes, their indices among the
    outputs of the network the run started from (and of the first network, `class_indices`),
    their test accuracy before (the unpruned network restricted to their outputs), pruned and
    fine-tuned, and the units removed."""
    return {**subset.to_json(), "class_indices": pruned.carprune_spec["class_indices"],
            "test_before": accuracy["test_before"], "test_pruned": accuracy["test_pruned"],
            "test_finetuned": accuracy["test_finetuned"],
            "units_removed": sum(len(rec.removed) for rec in result.layers.values())}


def _write(pruned: nn.Module, result, global_steps, summary: dict) -> None:
    out = Path(summary["config"]["out"])
    io.save(pruned, out, extra={"pruned_by": summary["command"]})
    if global_steps is not None:
        io.atomic_write(out / "filters_kept.png", filters_kept_png(result, global_steps))
    io.write_json(out / "result.json", summary)


def _print(result, summary: dict) -> None:
    m, acc = summary["model"], summary["accuracy"]
    rows = [[name, f"{rec.filters_before} -> {rec.filters_after}",
             " ".join(map(str, rec.removed[:10])) + (" ..." if len(rec.removed) > 10 else "")]
            for name, rec in result.layers.items()]
    print(table(rows, ["layer", "filters", "removed first (original index)"]))
    lb, la = m["latency_ms_before"], m["latency_ms_after"]
    print(table([["params", m["params_before"], m["params_after"]],
                 ["MACs", m["macs_before"], m["macs_after"]],
                 ["latency ms (batch 1 / 64)", f"{lb['batch1']:.2f} / {lb['batch64']:.1f}",
                  f"{la['batch1']:.2f} / {la['batch64']:.1f}"],
                 ["test accuracy", f"{acc['test_before']:.4f}",
                  f"{acc['test_pruned']:.4f} pruned / {acc['test_finetuned']:.4f} fine-tuned"],
                 ["val agreement with the original", "1.0000",
                  f"{acc['val_agreement_pruned']:.4f} pruned / "
                  f"{acc['val_agreement_finetuned']:.4f} fine-tuned"]],
                ["", "before", "after"]))
    if "classes" in summary:
        c = summary["classes"]
        print(f"specialised to {len(c['kept'])} of {c['of']} classes ({', '.join(c['kept'])}): "
              f"test accuracy on them {c['test_before']:.4f} before (the unpruned network on "
              f"their outputs), {c['test_pruned']:.4f} pruned, {c['test_finetuned']:.4f} "
              f"fine-tuned; {c['units_removed']} units removed")
    print(f"CAR took {result.seconds:.1f} s ({result.engine} engine), fine-tuning "
          f"{summary['seconds']['finetune']:.1f} s; written to {summary['config']['out']}")


def filters_kept_png(result, steps) -> bytes:
    """Global CAR's order across layers: each layer's share of filters kept against the
    budget left, one line per layer."""
    from matplotlib.figure import Figure

    from ..interpret.pictures import png

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
