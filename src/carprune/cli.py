"""The command line: parses, then calls `runs.py`, which does the work.

argparse (standard library) rather than a third-party CLI package: it gives `--layers conv1
conv2` (nargs) and exit status 2 for usage errors, which is exactly our contract.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from . import dist, io, runs
from .criteria import CRITERIA
from .data import load_data
from .errors import CarpruneError
from .models import list_models
from .scoring import DEFAULT_MEMORY_BUDGET


def cmd_prune(args) -> None:
    data = load_data(args.data, args.data_dir)
    if args.model:
        source = io.from_factory(args.model, args.weights, data, args.trust_pickle)
    elif args.checkpoint:
        source = args.checkpoint
    else:
        raise CarpruneError("give a checkpoint directory, or --model package.module:factory "
                            "(with --weights FILE)")
    budgets = {"macs": args.target_macs, "params": args.target_params,
               "latency": args.target_latency_ms}
    given = [kind for kind, value in budgets.items() if value is not None]
    if len(given) > 1:
        raise CarpruneError("give one budget: --target-macs, --target-params or "
                            "--target-latency-ms, not several")
    budget = given[0] if given else "macs"
    runs.prune_run(source, data, args.layers, args.keep, args.out, step=args.step,
                   screen=args.screen,
                   score_samples=args.score_samples, engine=args.engine,
                   memory_budget_gib=args.memory_budget, finetune_epochs=args.finetune_epochs,
                   finetune_lr=args.finetune_lr, seed=args.seed, criterion=args.criterion,
                   train_samples=args.train_samples, restart=args.restart,
                   target=budgets[budget], budget=budget, cost=args.cost,
                   min_keep=args.min_keep, ignore=args.ignore, labels=args.labels,
                   round_to=args.round_to, compensate=args.compensate)


def cmd_compare(args) -> None:
    runs.refuse_existing_output(args.out)
    runs.compare_run(args.checkpoint, load_data(args.data, args.data_dir), args.layers,
                     args.criteria, args.out, args.keep_grid, args.retrain_epochs, args.seeds,
                     args.score_samples, args.train_samples)


def cmd_explain(args) -> None:
    from .interpret import explain_run

    explain_run(args.checkpoint, load_data(args.data, args.data_dir), args.layers, args.out,
                prune_run=args.prune_run, score_samples=args.score_samples, engine=args.engine,
                top_k=args.top_k)


def cmd_compress(args) -> None:
    from pathlib import Path

    from .compress import compress_run, export_onnx, load_carz

    out = Path(args.out)
    compress_run(args.checkpoint, load_data(args.data, args.data_dir), out,
                 weight_sparsity=args.weight_sparsity, bits=args.bits,
                 finetune_epochs=args.finetune_epochs, prune_rounds=args.prune_rounds,
                 baseline=args.baseline, layer_sparsity=dict(args.layer_sparsity or []),
                 layer_bits=dict(args.layer_bits or []))
    if args.onnx:
        model = load_carz(out / "model.carz")
        diff = export_onnx(model, out / "model.onnx", model.carprune_spec["input_shape"])
        if diff is not None:  # None: export_onnx already said onnxruntime is missing
            print(f"wrote {out / 'model.onnx'}; onnxruntime matches PyTorch "
                  f"(max abs diff {diff:.1e})")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, args.data_dir)


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


def layer_value(kind):
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


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist, fashion-mnist-colour (randomly tinted), mnist (with "
                        "--data-dir) or an image-folder path")
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
    p.set_defaults(func=runs.train_run)

    p = sub.add_parser("evaluate", help="accuracy of a checkpoint, overall and per class")
    p.add_argument("checkpoint", help="checkpoint directory or shipped name (convnet-fmnist)")
    _data_args(p)
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=runs.evaluate_run)

    p = sub.add_parser("prune", help="greedy CAR filter pruning, then fine-tuning")
    p.add_argument("checkpoint", nargs="?",
                   help="checkpoint directory or shipped name (convnet-fmnist)")
    p.add_argument("--model", default=None,
                   help="instead of a checkpoint: a factory package.module:function (or a zoo "
                        "name), e.g. torchvision.models:resnet18")
    p.add_argument("--weights", default=None,
                   help="with --model: a safetensors state dict (or, with --trust-pickle, a "
                        "torch.save file, read with weights_only=True)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow --weights to be a pickle (torch.save) file")
    _data_args(p)
    p.add_argument("--layers", nargs="+", default=None,
                   help="conv layers, pruned in order (with a target: the layers of the "
                        "global run; default all)")
    p.add_argument("--target-macs", type=float, default=None,
                   help="global CAR until this fraction of the original MACs is left")
    p.add_argument("--target-params", type=float, default=None,
                   help="global CAR until this fraction of the original parameters is left")
    p.add_argument("--target-latency-ms", type=float, default=None,
                   help="global CAR until one image (batch 1) runs in this many milliseconds "
                        "here, measured after every step")
    p.add_argument("--cost", choices=["macs", "params", "latency"], default=None,
                   help="what a removal saves, for global CAR's accuracy-per-cost ranking "
                        "(default: what the target counts)")
    p.add_argument("--min-keep", type=float, default=0.1,
                   help="global CAR keeps at least this fraction of every layer (default 0.1)")
    p.add_argument("--round-to", type=int, default=1,
                   help="global CAR leaves every layer a multiple of N filters (8 suits "
                        "AVX2 CPUs: odd widths can run slower than the unpruned network)")
    p.add_argument("--compensate", action="store_true",
                   help="refit the layers that read a pruned filter's channel by least "
                        "squares on the rest, when scoring and when removing (CAR sees what "
                        "the network can make up for without fine-tuning)")
    p.add_argument("--ignore", nargs="+", default=None,
                   help="layers global CAR must not prune (e.g. the stem)")
    p.add_argument("--labels", choices=["data", "model"], default="data",
                   help="score against the labels, or against the unpruned model's "
                        "predictions (for unlabelled images)")
    p.add_argument("--keep", type=_keep, default=0.5,
                   help="per layer: a fraction in (0, 1) or a count of filters (default 0.5)")
    p.add_argument("--criterion", choices=[c for c in CRITERIA if c != "car-oneshot"],
                   default="car", help="car (default) or another criterion to compare with")
    p.add_argument("--step", type=int, default=1,
                   help="filters removed per re-scoring; 1 is exact greedy CAR (default)")
    p.add_argument("--screen", type=int, default=None,
                   help="approximate: after the first full scoring, re-score only the M "
                        "filters with the lowest CAR index so far")
    p.add_argument("--score-samples", type=int, default=None,
                   help="score on the first N val images only (default: all)")
    p.add_argument("--engine", choices=["fast", "naive"], default="fast")
    p.add_argument("--memory-budget", type=float, default=DEFAULT_MEMORY_BUDGET / 2**30,
                   help="GiB the fast engine may use for candidate batches (default 2)")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--train-samples", type=int, default=None,
                   help="fine-tune on the first N training images only (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True,
                   help="run directory; re-running the same command there resumes the run")
    p.add_argument("--restart", action="store_true",
                   help="discard an unfinished or finished run in --out and start again")
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
    p.add_argument("--train-samples", type=int, default=None,
                   help="retrain on the first N training images only (default: all)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="fast against naive CAR: speed-up, lower bound, same picks")
    p.add_argument("checkpoint", nargs="?", default="convnet-fmnist")
    _data_args(p)
    p.add_argument("--layers", nargs="+", default=None, help="default: every conv layer")
    p.add_argument("--steps", type=int, default=3, help="greedy steps per layer (default 3)")
    p.add_argument("--score-samples", type=int, default=None)
    p.add_argument("--keep", type=_keep, default=0.5, help="keep for the whole timed run")
    p.add_argument("--whole-run", action="store_true",
                   help="also time exact fast CAR of every layer to --keep, end to end (about "
                        "4 more minutes on two cores)")
    p.add_argument("--approx", action="store_true",
                   help="also run the approximate modes and report their agreement with the "
                        "whole run (implies --whole-run)")
    p.add_argument("--approx-step", type=int, default=4, help="K for --step K (default 4)")
    p.add_argument("--approx-screen", type=int, default=8,
                   help="M for --screen M (default 8)")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=runs.bench_run)

    p = sub.add_parser("explain", help="which classes need each filter, what excites it, "
                       "colour and diversity; one report.html")
    p.add_argument("checkpoint", help="checkpoint directory or shipped name (convnet-fmnist)")
    _data_args(p)
    p.add_argument("--layers", nargs="+", required=True, help="conv layers to explain")
    p.add_argument("--prune-run", default=None,
                   help="a carprune prune output directory: mark its CAR removal order")
    p.add_argument("--score-samples", type=int, default=None,
                   help="score on the first N val images only (default: all)")
    p.add_argument("--engine", choices=["fast", "naive"], default="fast")
    p.add_argument("--top-k", type=int, default=6, help="patches shown per filter (default 6)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("compress", help="weight pruning, k-means sharing, Huffman coding into "
                       "model.carz, with a size table")
    p.add_argument("checkpoint", help="checkpoint or run directory, or a shipped name")
    _data_args(p)
    p.add_argument("--weight-sparsity", type=float, default=0.7,
                   help="share of each layer's weights set to zero (default 0.7)")
    p.add_argument("--bits", type=int, default=5,
                   help="2**bits shared values per layer (default 5)")
    p.add_argument("--layer-sparsity", type=layer_value(float), nargs="+", metavar="LAYER=S",
                   help="per-layer exceptions, e.g. conv1=0.5")
    p.add_argument("--layer-bits", type=layer_value(int), nargs="+", metavar="LAYER=B",
                   help="per-layer exceptions, e.g. conv1=3")
    p.add_argument("--finetune-epochs", type=int, default=1,
                   help="after weight pruning, and again for the centroids (default 1)")
    p.add_argument("--prune-rounds", type=int, default=1,
                   help="reach the sparsity in R rounds of pruning and fine-tuning, on a "
                   "cubic ramp (default 1)")
    p.add_argument("--baseline", default=None, help="unpruned checkpoint for the baseline "
                   "accuracy (default: the one the run's result.json names)")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx, checked against PyTorch with onnxruntime")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("demo", help="the main job on the shipped network (what make demo runs)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    warnings.formatwarning = lambda message, *rest, **kw: f"carprune: warning: {message}\n"
    try:
        dist.init_from_env()
        args.func(args)
    except CarpruneError as exc:
        print(f"carprune: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("carprune: interrupted; the last completed step is saved: run the same command "
              "again to resume", file=sys.stderr)
        sys.exit(130)
