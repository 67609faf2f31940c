"""`carprune bench`: the fast engine against the naive one per layer (seconds, speed-up, lower
bound, identical picks), optionally a whole timed run and the approximate modes; bench.json."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import bench, io
from ..car import check_layers
from ..config import BenchConfig
from ..data import check_fits, first_images, load_data
from ..devices import resolve_device
from ..errors import CarpruneError
from ..groups import Surgery
from .common import held_in_memory, table


def run(config: BenchConfig) -> dict:
    if config.kinds:
        return _kinds(config)
    device = resolve_device(config.device)
    model = io.load(config.checkpoint).to(device)
    data = load_data(config.data, config.data_dir, model, config.image_size, config.workers)
    check_fits(model, data)
    surgery = Surgery(model, data.example(1).to(device))
    layers = config.layers or surgery.conv_layers()
    check_layers(surgery, layers)
    scoring = held_in_memory(data, first_images(data.val, config.score_samples,
                                                "--score-samples"), config.memory_budget, device)
    rows, throughput = bench.bench_layers(model, scoring, layers, config.steps)
    run_seconds = approximate = None
    if config.whole_run or config.approx:
        print(f"whole run: every layer to keep {config.keep} with the fast engine ...")
        exact, candidates = bench.whole_run(model, scoring, layers, config.keep)
        run_seconds = exact.seconds
        if config.approx:
            approximate = bench.approximations(model, scoring, data.test, exact, layers,
                                               config.keep, config.approx_step,
                                               config.approx_screen)
    else:
        candidates = bench.run_candidates(model, layers, config.keep)
    overall = bench.overall_speedup(rows, candidates, run_seconds)
    report = bench.to_json(rows, throughput, run_seconds, overall, scoring.total, config.steps,
                           approximate)
    io.write_json(Path(config.out) / "bench.json", report)
    _print(config, rows, throughput, scoring.total, approximate, run_seconds, candidates,
           overall, report["identical_picks"])
    _check_identical(report["identical_picks"])
    return report


def _kinds(config: BenchConfig) -> dict:
    """Per reference network and unit kind: naive against fast, identical picks, bound."""
    device = resolve_device(config.device)
    fmnist = load_data("fashion-mnist", config.data_dir)
    report = {"steps": config.steps, "networks": {}}
    for name, model, scoring, kinds in bench.reference_networks(fmnist,
                                                                config.score_samples or 512):
        model, scoring = model.to(device), scoring.to(device)
        layers = bench.sample_layers(Surgery(model, scoring.example()), kinds=kinds)
        print(f"{name}: {', '.join(layers)} ({scoring.total} scoring images)")
        rows, throughput = bench.bench_layers(model, scoring, layers, config.steps)
        report["networks"][name] = bench.to_json(rows, throughput, None, None, scoring.total,
                                                 config.steps)
        print(_kind_table(report["networks"][name]["kinds"]))
    kinds = [dict(k, network=n) for n, r in report["networks"].items() for k in r["kinds"]]
    report["identical_picks"] = all(k["identical"] for k in kinds)
    io.write_json(Path(config.out) / "bench.json", report)
    print(_kind_table(kinds))
    print(_kind_summary(kinds))
    print(f"identical picks: {'yes' if report['identical_picks'] else 'NO'}; written to "
          f"{Path(config.out) / 'bench.json'}")
    _check_identical(report["identical_picks"])
    return report


def _kind_table(kinds: list[dict]) -> str:
    return table([[k.get("network", ""), k["kind"], k["layers"], k["candidates"],
                   f"{k['naive_seconds']:.2f}", f"{k['fast_seconds']:.2f}",
                   f"{k['speedup']:.1f}x", f"{k['bound_seconds']:.2f}",
                   _ratio(k["fast_over_bound"]), _within(k),
                   "yes" if k["identical"] else "NO"] for k in kinds],
                 ["network", "kind", "layers", "candidates", "naive s", "fast s", "speed-up",
                  "bound s", "fast/bound", "within 2x", "same picks"])


def _within(kind: dict) -> str:
    """The 2x target's verdict on a kind: new kinds (bench.NEW_KINDS) are not held to it."""
    if kind["new"]:
        return "new kind"
    return "-" if kind["fast_over_bound"] is None else \
        "yes" if kind["fast_over_bound"] <= 2 else "NO"


def _kind_summary(kinds: list[dict]) -> str:
    """One line each: the old kinds against their bound, the new kinds' speed-ups."""
    old = [k for k in kinds if not k["new"] and k["fast_over_bound"] is not None]
    new = [k for k in kinds if k["new"]]
    lines = []
    if old:
        worst = max(old, key=lambda k: k["fast_over_bound"])
        verdict = "yes" if worst["fast_over_bound"] <= 2 else "NO"
        lines.append(f"old kinds within 2x of their bound: {verdict} (largest "
                     f"{worst['fast_over_bound']:.2f}, {worst['network']} {worst['kind']})")
    if new:
        speedups = ", ".join(f"{k['network']} {k['kind']} {k['speedup']:.1f}x" for k in new)
        lines.append(f"new kinds ({', '.join(bench.NEW_KINDS)}), speed-up over naive: "
                     f"{speedups}")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _check_identical(identical: bool) -> None:
    if not identical:
        raise CarpruneError("the fast engine chose differently from the naive one; please "
                            "report this with bench.json")


def _print(config: BenchConfig, rows, throughput: float, images: int, approximate,
           run_seconds, candidates: dict, overall: float, identical: bool) -> None:
    print(table([[r.layer, r.kind, r.candidates, f"{r.naive_seconds:.2f}", f"{r.fast_seconds:.2f}",
                  f"{r.speedup:.1f}x", f"{r.bound_seconds:.2f}",
                  _ratio(r.fast_over_bound), "yes" if r.identical else "NO"]
                 for r in rows],
                ["layer", "kind", "candidates", "naive s", "fast s", "speed-up", "bound s",
                 "fast/bound", "same picks"]))
    print(f"scoring set: {images} images; network throughput "
          f"{throughput / 1e9:.1f} GMAC/s on {torch.get_num_threads()} threads")
    if approximate:
        print("approximate modes against the exact whole run:")
        print(table([[a["mode"], f"{a['seconds']:.1f}", f"{a['speedup']:.1f}x",
                      f"{a['identical_picks']:.0%}", f"{100 * a['val_diff']:+.2f}",
                      f"{100 * a['test_diff']:+.2f}"] for a in approximate],
                    ["mode", "seconds", "faster", "same picks", "val acc diff (points)",
                     "test acc diff (points)"]))
    if run_seconds is not None:
        print(f"whole run (every layer to keep {config.keep}, fast engine): "
              f"{run_seconds:.1f} s")
    else:
        print(f"overall: a keep-{config.keep} run's {sum(candidates.values())} candidates at "
              "the per-candidate times above (--whole-run measures the fast side end to end)")
    print(f"overall speed-up: {overall:.1f}x (identical picks: {'yes' if identical else 'NO'})")
    print(f"written to {Path(config.out) / 'bench.json'}")
