"""The command line: a parser derived from `config.py`, then the command's `run`.

The parser is generated with argparse (standard library) from the config dataclasses rather
than by a third-party CLI package: argparse already gives `--layers conv1 conv2` (nargs) and
exit status 2 with a usage line and one sentence for usage errors, our contract, and every
option's default, help and check stay in the one dataclass field that declares it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
import types
import typing
import warnings

import torch

from . import dist
from .commands import COMMANDS, run_command
from .config import flag
from .devices import resolve_device
from .errors import CarpruneError


def _argparse_keywords(f: dataclasses.Field, hint) -> dict:
    """What the annotation says (flag, list, type), overridden by the field's own keywords."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kwargs: dict = {"help": f.metadata["help"]}
    if hint is bool:
        kwargs["action"] = "store_true"
    elif typing.get_origin(hint) is list:
        kwargs.update(nargs="+", type=typing.get_args(hint)[0])
    else:
        kwargs["type"] = hint
    kwargs.update({k: v for k, v in f.metadata["cli"].items() if k != "positional"})
    if kwargs.get("nargs") is None:
        kwargs.pop("nargs", None)
    return kwargs


def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        kwargs = _argparse_keywords(f, hints[f.name])
        if f.metadata["cli"].get("positional"):
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument(flag(f.name), dest=f.name, **kwargs)
    parser.set_defaults(**{f.name: None if f.default is dataclasses.MISSING else f.default
                           for f in dataclasses.fields(config)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carprune", description="Remove the filters a CNN needs least (CAR: "
        "classification accuracy reduction) and explain the ones it keeps.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--debug", action="store_true", help="on an error caused by another "
                        "exception (your factory's, timm's), also print that one's traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config, help_text) in COMMANDS.items():
        add_options(sub.add_parser(name, help=help_text), config)
    return parser


def to_config(args: argparse.Namespace):
    """The command's config from the parsed arguments (which checks them)."""
    config = COMMANDS[args.command][0]
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)}
    for f in dataclasses.fields(config):  # a fresh list for every default list
        if values[f.name] is None and f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return config(**values)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be 1 or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    warnings.formatwarning = lambda message, *rest, **kw: f"carprune: warning: {message}\n"
    try:
        config = to_config(args)
        dist.init_from_env(resolve_device(config.device))
        run_command(args.command, config)
    except CarpruneError as exc:
        cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if args.debug and cause is not None:
            traceback.print_exception(cause, file=sys.stderr)
        print(f"carprune: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("carprune: interrupted; the last completed step is saved: run the same command "
              "again to resume", file=sys.stderr)
        sys.exit(130)
