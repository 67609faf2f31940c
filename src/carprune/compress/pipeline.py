"""Deep Compression (Han et al. 2016) on top of CAR filter removal, with its size accounting.

Stages, each measured on the test split: weight pruning by magnitude (masks kept through
fine-tuning), weight sharing by k-means (centroids fine-tuned), Huffman coding into
`model.carz`. The last column of the size table is the file on disk; the middle ones are the
formats Han et al. count (see `sparse_bytes`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from .. import io
from ..data import check_fits
from ..errors import CarpruneError
from ..train import Recipe, evaluate, fit
from .carz import coded_breakdown, load_carz, record_sizes, write_carz
from .kmeans import freeze_, quantize_

STAGES = ("original", "car", "pruned", "quantized", "coded")
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
CODEBOOK_ENTRY_BYTES = 2  # centroids are stored as float16


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights are pruned, shared and coded: every conv and linear."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}


def per_layer(default: float, overrides: Mapping[str, float] | None, layers: list[str],
              what: str) -> dict:
    """`default` for every layer, except those `overrides` names (which must exist)."""
    unknown = sorted(set(overrides or {}) - set(layers))
    if unknown:
        raise CarpruneError(f"per-layer {what} names {unknown[0]!r}, which is not a conv or "
                            f"linear layer of the model; choose from {', '.join(layers)}")
    return {name: (overrides or {}).get(name, default) for name in layers}


def prune_weights(model: nn.Module, sparsity: float, scope: str = "layer",
                  layer_sparsity: Mapping[str, float] | None = None,
                  fraction: float = 1.0) -> None:
    """Mask the smallest-magnitude weights (torch.nn.utils.prune); masks stay through training.

    scope "layer" prunes each layer to `sparsity` (or its entry in `layer_sparsity`); "global"
    ranks all weights together, which only makes sense where weight scales are comparable (a
    conv followed by BatchNorm has an arbitrary scale). `fraction` of those sparsities is
    reached now; called again with a larger fraction, it masks more (the masks combine).
    """
    model.to(memory_format=torch.contiguous_format)  # torch.nn.utils.prune views weights flat
    layers = weight_layers(model)

    def masked(modules) -> int:
        return sum(int((m.weight_mask == 0).sum()) for m in modules if prune.is_pruned(m))

    if scope == "global":
        if layer_sparsity:
            raise CarpruneError("global weight pruning takes one sparsity; drop the per-layer "
                                "values or use scope 'layer'")
        total = sum(m.weight.numel() for m in layers.values())
        prune.global_unstructured([(m, "weight") for m in layers.values()],
                                  pruning_method=prune.L1Unstructured,
                                  amount=round(fraction * sparsity * total)
                                  - masked(layers.values()))
    elif scope == "layer":
        for name, amount in per_layer(sparsity, layer_sparsity, list(layers),
                                      "sparsity").items():
            module = layers[name]
            prune.l1_unstructured(module, "weight", amount=round(
                fraction * amount * module.weight.numel()) - masked([module]))
    else:
        raise CarpruneError(f"unknown pruning scope {scope!r}; use 'layer' or 'global'")


def sparsity_schedule(rounds: int) -> list[float]:
    """Fractions of the final sparsity reached after each of `rounds` rounds: Zhu & Gupta's
    cubic ramp (fast at first, while there are many small weights, then slower)."""
    return [1 - (1 - r / rounds) ** 3 for r in range(1, rounds + 1)]


def make_permanent(model: nn.Module) -> None:
    """Fold the masks into the weights: zeros from now on, no hooks."""
    for module in weight_layers(model).values():
        if prune.is_pruned(module):
            prune.remove(module, "weight")


def gap_bits(module: nn.Module) -> int:
    """Han et al.'s relative-index width: 8 bits for conv layers, 5 for fully connected."""
    return 5 if isinstance(module, nn.Linear) else 8


def sparse_bytes(weight: torch.Tensor, value_bits: int, index_bits: int) -> int:
    """Bytes of the relative-index sparse format: every entry (nonzero or filler zero) is a
    value of `value_bits` plus a gap of `index_bits` (a filler per 2**index_bits skipped)."""
    positions = weight.detach().flatten().nonzero().flatten()
    gaps = torch.diff(positions, prepend=torch.tensor([-1])) - 1
    entries = len(positions) + int((gaps // 2 ** index_bits).sum())
    return math.ceil(entries * (value_bits + index_bits) / 8)


def dense_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _baseline_model(source: Path, model: nn.Module,
                    baseline: str | os.PathLike | nn.Module | None) -> nn.Module | None:
    """The unpruned network, for its accuracy: the argument, else the checkpoint the run's
    result.json names, else the model itself when it never lost a filter."""
    if isinstance(baseline, nn.Module):
        return baseline
    if baseline is not None:
        return io.load(baseline)
    result = source / "result.json"
    if result.is_file():
        name = io.read_json(result).get("checkpoint")
        if name and (Path(name).is_dir() or (io.ZOO_DIR / str(name)).is_dir()):
            return io.load(name)
    return None if io.spec_of(model).get("pruning_history") else model


def compress_run(checkpoint_or_run_dir: str | os.PathLike, data, out: str | os.PathLike,
                 weight_sparsity: float = 0.7, bits: int = 5, finetune_epochs: int = 1,
                 baseline: str | os.PathLike | nn.Module | None = None, *,
                 layer_sparsity: Mapping[str, float] | None = None,
                 layer_bits: Mapping[str, int] | None = None, scope: str = "layer",
                 prune_rounds: int = 1, finetune_lr: float = 0.01, centroid_lr: float = 1e-4,
                 seed: int = 0, progress: bool = True) -> dict:
    """Prune weights, share them, code them into out/model.carz; write out/sizes.json, print
    the size table and return it.

    layer_sparsity, layer_bits: per-layer exceptions to weight_sparsity and bits (a first conv
    layer of a few hundred weights is both fragile and dominated by its codebook).
    finetune_epochs: epochs of fine-tuning after weight pruning, and again for the centroids.
    prune_rounds: reach the sparsity in this many rounds (`sparsity_schedule`), each followed
    by `finetune_epochs` of fine-tuning with the masks (Han et al.'s iterative pruning).
    baseline: the unpruned checkpoint (or model) for the baseline accuracy, when the run's
    result.json does not name one that exists here.
    """
    out = Path(out)
    _check_settings(out, finetune_epochs, prune_rounds)
    source = io.resolve_checkpoint(checkpoint_or_run_dir)
    model = io.load(source)
    check_fits(model, data)
    modules = weight_layers(model)
    widths = _layer_settings(modules, weight_sparsity, layer_sparsity, bits, layer_bits)
    base = _baseline_model(source, model, baseline)
    unpruned = io.build(dict(io.spec_of(model), pruning_history=[]))
    accuracy = {"baseline": evaluate(base, data.test).accuracy if base is not None else None,
                "car": evaluate(model, data.test).accuracy}
    original = weight_layers(unpruned)
    sizes = {name: {**dict.fromkeys(STAGES, 0), "original": dense_bytes([original[name].weight]),
                    "car": dense_bytes([m.weight])} for name, m in modules.items()}
    others = [t for key, t in model.state_dict().items()
              if key not in {f"{name}.weight" for name in modules}]
    for r, fraction in enumerate(sparsity_schedule(prune_rounds)):
        prune_weights(model, weight_sparsity, scope, layer_sparsity, fraction)
        fit(model, data.train, finetune_epochs, Recipe(lr=finetune_lr, seed=seed + 2 * r),
            progress=progress, desc=f"fine-tune pruned ({r + 1}/{prune_rounds})")
    make_permanent(model)
    accuracy["pruned"] = evaluate(model, data.test).accuracy
    zeros = {name: float((m.weight == 0).float().mean()) for name, m in modules.items()}
    codebooks = _share_weights(modules, widths, sizes)
    accuracy["quantized"] = evaluate(model, data.test).accuracy
    fit(model, data.train, finetune_epochs, Recipe(lr=centroid_lr, seed=seed + 1),
        progress=progress, desc="fine-tune centroids")
    for module in modules.values():
        freeze_(module)
    path = out / "model.carz"
    write_carz(path, model, [f"{name}.weight" for name in modules])
    accuracy["final"] = evaluate(load_carz(path), data.test).accuracy
    report = _size_report(path, sizes, others, unpruned, accuracy)
    io.write_json(out / "sizes.json", report)
    print(size_table(report, zeros, codebooks))
    print(parts_table(report))
    if base is None:
        print("baseline accuracy unknown: the run names no unpruned checkpoint found here; "
              "pass baseline= (the CLI's --baseline) to report it")
    print(f"written to {path} and {out / 'sizes.json'}")
    return report


def _check_settings(out: Path, finetune_epochs: int, prune_rounds: int) -> None:
    for name in ("model.carz", "sizes.json"):
        if (out / name).exists():
            raise CarpruneError(f"{out / name} already exists; choose another --out or remove "
                                "it")
    if finetune_epochs < 0:
        raise CarpruneError(f"--finetune-epochs must be 0 or more, got {finetune_epochs}")
    if not isinstance(prune_rounds, int) or prune_rounds < 1:
        raise CarpruneError(f"--prune-rounds must be a whole number, 1 or more, got "
                            f"{prune_rounds}")


def _layer_settings(modules: dict[str, nn.Module], weight_sparsity: float,
                    layer_sparsity: Mapping[str, float] | None, bits: int,
                    layer_bits: Mapping[str, int] | None) -> dict[str, int]:
    """Check every layer's sparsity and bits; return the bits per layer."""
    names = list(modules)
    sparsity = per_layer(weight_sparsity, layer_sparsity, names, "sparsity")
    widths = per_layer(bits, layer_bits, names, "bits")
    for name in names:
        if not 0 <= sparsity[name] < 1:
            raise CarpruneError(f"weight sparsity of {name} must be in [0, 1), got "
                                f"{sparsity[name]}; e.g. 0.7 removes 70% of its weights")
        if not isinstance(widths[name], int) or not 1 <= widths[name] <= 8:
            raise CarpruneError(f"bits of {name} must be a whole number from 1 to 8, got "
                                f"{widths[name]}")
    return widths


def _share_weights(modules: dict[str, nn.Module], widths: dict[str, int],
                   sizes: dict[str, dict]) -> dict[str, int]:
    """k-means weight sharing of every layer; records the pruned and quantized sizes."""
    codebooks = {}
    for name, module in modules.items():
        sizes[name]["pruned"] = sparse_bytes(module.weight, 32, gap_bits(module))
        codebooks[name] = quantize_(module, widths[name])
        sizes[name]["quantized"] = sparse_bytes(module.weight, widths[name], gap_bits(module)) \
            + CODEBOOK_ENTRY_BYTES * codebooks[name]
    return codebooks


def _size_report(path: Path, sizes: dict[str, dict], others: list, unpruned: nn.Module,
                 accuracy: dict) -> dict:
    """sizes.json: bytes per layer and stage (the coded ones read back from the file)."""
    records = record_sizes(path)
    parts = coded_breakdown(path)
    for name in sizes:
        sizes[name]["coded"] = records[f"{name}.weight"]
    raw = dense_bytes(others)
    total = {"original": dense_bytes(unpruned.state_dict().values()),
             "car": sum(s["car"] for s in sizes.values()) + raw,
             "pruned": sum(s["pruned"] for s in sizes.values()) + raw,
             "quantized": sum(s["quantized"] for s in sizes.values()) + raw,
             "coded": os.path.getsize(path)}
    return {"layers": {name: {"bytes": s, "factor": s["original"] / s["coded"],
                              "coded_parts": parts[f"{name}.weight"]}
                       for name, s in sizes.items()},
            "total": {"bytes": total, "factor": total["original"] / total["coded"]},
            "accuracy": accuracy}


def parts_table(report: dict) -> str:
    """Where each layer's coded bytes go, read back from its record in the file."""
    names = list(next(iter(report["layers"].values()))["coded_parts"])
    rows = [[name, *(f"{entry['coded_parts'][p]:g}" for p in names), str(entry["bytes"]["coded"])]
            for name, entry in report["layers"].items()]
    header = ["coded bytes", *names, "record"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                     for r in [header, *rows])


def size_table(report: dict, zeros: Mapping[str, float], centroids: Mapping[str, int]) -> str:
    """The size table as text: per layer its share of zero weights, codebook size and bytes
    at each stage, then the whole model, then the accuracies."""
    header = ["layer", "zeros", "k", *STAGES, "factor"]
    rows = [[name, f"{zeros[name]:.2f}" if name in zeros else "",
             str(centroids.get(name, "")),
             *(str(entry["bytes"][s]) for s in STAGES), f"{entry['factor']:.1f}x"]
            for name, entry in [*report["layers"].items(), ("total", report["total"])]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i > 0 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    acc = report["accuracy"]
    lines.append("test accuracy: " + ", ".join(
        f"{stage} {'-' if acc[stage] is None else f'{100 * acc[stage]:.2f}%'}"
        for stage in ("baseline", "car", "pruned", "quantized", "final")))
    lines.append("bytes: original/car = float32 weights of the unpruned/filter-pruned network; "
                 "pruned/quantized = 32-bit/`bits`-bit values + 8-bit (conv) or 5-bit (fc)\n"
                 "index gaps (+ float16 codebook); coded = the layer's record in model.carz. "
                 "Total: plus biases and BatchNorm as float32; coded = the file's size.")
    return "\n".join(lines)
