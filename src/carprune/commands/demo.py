"""`carprune demo` (what `make demo` runs): the main job on the shipped network and data.

1. exact CAR on every conv layer to keep half, with fine-tuning;
2. the paper's comparison at keep 0.5 for conv1 and conv2 (CAR, l1, taylor, random);
3. the interpretation of conv1 and conv2;
4. one report.html tying it together, with the command that reproduces each part.
"""

from __future__ import annotations

import html
import shutil
import time
from pathlib import Path

from .. import io
from ..config import CompareConfig, DemoConfig, PruneConfig
from ..data import fashion_mnist
from ..devices import resolve_device
from ..errors import CarpruneError
from ..interpret.report import img_tag
from . import compare, prune
from .common import table
from .explain import explain_run

SHIPPED = "convnet-fmnist"
LAYERS = ["conv1", "conv2", "conv3"]
EXPLAINED = ["conv1", "conv2"]
CRITERIA = ["car", "l1", "taylor", "random"]
GRID = [1.0, 0.75, 0.5]


def _fresh(out: Path) -> None:
    """The demo owns its folder: a previous demo's output is replaced, anything else refused."""
    if out.exists():
        if not (out / "summary.json").is_file():
            raise CarpruneError(f"{out} exists and was not written by carprune demo; choose "
                                "another --out or remove it")
        shutil.rmtree(out)


def run(config: DemoConfig) -> dict:
    out, data_dir = Path(config.out), config.data_dir
    _fresh(out)
    data_flag = f" --data-dir {data_dir}" if data_dir else ""
    commands = {
        "prune": f"carprune prune {SHIPPED} --layers {' '.join(LAYERS)} --keep 0.5 "
                 f"--finetune-epochs 2{data_flag} --out {out / 'prune'}",
        "compare": f"carprune compare {SHIPPED} --layers {' '.join(EXPLAINED)} --criteria "
                   f"{','.join(CRITERIA)} --keep-grid {','.join(map(str, GRID))}{data_flag} "
                   f"--out {out / 'compare'}",
        "explain": f"carprune explain {SHIPPED} --layers {' '.join(EXPLAINED)} --prune-run "
                   f"{out / 'prune'}{data_flag} --out {out / 'explain'}",
    }
    stages: dict[str, float] = {}

    start = time.perf_counter()
    data = fashion_mnist(data_dir)
    stages["load data"] = time.perf_counter() - start

    start = time.perf_counter()
    pruned = prune.run(PruneConfig(checkpoint=SHIPPED, layers=LAYERS, keep=0.5,
                                   finetune_epochs=2, out=str(out / "prune"),
                                   device=config.device), data)
    stages["exact CAR, every conv layer to half, + 2 epochs fine-tuning"] = \
        time.perf_counter() - start

    start = time.perf_counter()
    # conv1 is pruned first, on the unpruned network and the same val set: its CAR order is
    # exactly the comparison's, so greedy CAR does not run twice
    first = {(LAYERS[0], "car"): pruned["layers"][LAYERS[0]]["removed"]}
    compared = compare.run(CompareConfig(checkpoint=SHIPPED, layers=EXPLAINED, criteria=CRITERIA,
                                         keep_grid=GRID, out=str(out / "compare"),
                                         device=config.device), data, known=first)
    stages["comparison with l1, taylor, random (conv1, conv2)"] = time.perf_counter() - start

    start = time.perf_counter()
    explain_run(SHIPPED, data, EXPLAINED, out / "explain", prune_run=out / "prune",
                device=resolve_device(config.device))
    stages["interpretation of conv1 and conv2"] = time.perf_counter() - start

    summary = {"prune": pruned, "compare": compared, "stage_seconds": stages,
               "commands": commands}
    io.atomic_write(out / "report.html", _report(summary, out))
    io.write_json(out / "summary.json", summary)

    print()
    print(table([[name, f"{sec:.0f}"] for name, sec in stages.items()]
                + [["total", f"{sum(stages.values()):.0f}"]], ["stage", "seconds"]))
    acc, m = pruned["accuracy"], pruned["model"]
    print(f"baseline test accuracy {acc['test_before']:.4f}; after CAR {acc['test_pruned']:.4f};"
          f" fine-tuned {acc['test_finetuned']:.4f}")
    print(f"params {m['params_before']} -> {m['params_after']}, MACs {m['macs_before']} -> "
          f"{m['macs_after']}, latency (batch 64) {m['latency_ms_before']['batch64']:.1f} -> "
          f"{m['latency_ms_after']['batch64']:.1f} ms")
    for layer, mg in compared["keep_0.5"].items():
        print(f"{layer} at keep 0.5: CAR {100 * mg['accuracy']['car']:.2f}% vs best other "
              f"({mg['best_other']}) {100 * mg['accuracy'][mg['best_other']]:.2f}%: margin "
              f"{100 * mg['margin']:+.2f} points")
    print(f"report: {out / 'report.html'}")
    return summary


def _report(summary: dict, out: Path) -> str:
    """One self-contained page (images inlined) over the three parts' outputs."""
    p, c = summary["prune"], summary["compare"]
    m, acc = p["model"], p["accuracy"]
    rows = [("parameters", f"{m['params_before']:,}", f"{m['params_after']:,}"),
            ("MACs per image", f"{m['macs_before']:,}", f"{m['macs_after']:,}"),
            ("latency, batch 1 (ms)", f"{m['latency_ms_before']['batch1']:.2f}",
             f"{m['latency_ms_after']['batch1']:.2f}"),
            ("latency, batch 64 (ms)", f"{m['latency_ms_before']['batch64']:.1f}",
             f"{m['latency_ms_after']['batch64']:.1f}"),
            ("test accuracy", f"{100 * acc['test_before']:.2f}%",
             f"{100 * acc['test_pruned']:.2f}% after CAR, "
             f"{100 * acc['test_finetuned']:.2f}% fine-tuned")]
    before_after = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{d}</td></tr>" for a, b, d in rows)
    layers = "".join(f"<tr><td>{name}</td><td>{rec['filters_before']} &rarr; "
                     f"{rec['filters_after']}</td><td>{' '.join(map(str, rec['removed'][:12]))}"
                     f"{' &hellip;' if len(rec['removed']) > 12 else ''}</td></tr>"
                     for name, rec in p["layers"].items())
    margins = "".join(
        f"<tr><td>{layer}</td>"
        + "".join(f"<td>{100 * v:.2f}</td>" for v in mg["accuracy"].values())
        + f"<td><b>{100 * mg['margin']:+.2f}</b> vs {mg['best_other']}</td></tr>"
        for layer, mg in c["keep_0.5"].items())
    crit_head = "".join(f"<th>{k}</th>" for k in next(iter(c["keep_0.5"].values()))["accuracy"])
    plots = "".join(img_tag((out / "compare" / f"compare_{layer}.png").read_bytes(),
                            f"comparison {layer}")
                    for layer in c["keep_0.5"])
    explain = out / "explain"
    pictures = "".join(img_tag(path.read_bytes(), path.stem) for path in
                       [explain / "filters_conv1.png", explain / "heatmap_conv1.png",
                        explain / "heatmap_conv2.png"] if path.is_file())
    stages = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.0f} s</td></tr>"
                     for k, v in summary["stage_seconds"].items())
    commands = "".join(f"<li><b>{k}</b>: <code>{html.escape(v)}</code></li>"
                       for k, v in summary["commands"].items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>carprune demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px}}
img{{max-width:100%;margin:0.5em 0}}code{{background:#f3f3f3;padding:2px 4px}}</style></head>
<body><h1>carprune demo: CAR on the shipped Fashion-MNIST convnet</h1>
<p>CAR removes the filters whose absence costs the least classification accuracy on the
scoring (val) split, re-scoring after every removal; accuracies below are on the test split.</p>
<h2>Before and after (every conv layer to half, 2 epochs fine-tuning)</h2>
<table><tr><th></th><th>before</th><th>after</th></tr>{before_after}</table>
<table><tr><th>layer</th><th>filters</th><th>removed first (original index, in order)</th></tr>
{layers}</table>
<h2>CAR against other criteria (one layer at a time, keep 0.5, no retraining)</h2>
<table><tr><th>layer</th>{crit_head}<th>CAR margin (points)</th></tr>{margins}</table>
{plots}
<h2>What the filters do</h2>
<p>conv1's filters with CAR's removal order (kept filters framed), and which classes need each
filter (accuracy lost per class without it). The full interpretation, with each filter's most
exciting image patches, is in <a href="explain/report.html">explain/report.html</a>.</p>
{pictures}
<h2>Stage times</h2><table>{stages}</table>
<h2>Reproduce each part</h2><ul>{commands}</ul>
</body></html>
"""
