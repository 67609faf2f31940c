"""The settings of a CAR run, each a small frozen object that refuses what makes no sense when
it is built (one sentence naming the fix), from Python as from the command line (config.py
builds them from its options)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CarpruneError
from ..scoring import EngineOptions as EngineOptions
from .records import GlobalProgress, LayerRecord

BUDGET_KINDS = ("macs", "params", "latency")
GLOBAL_TARGETS = "--target-macs, --target-params or --target-latency-ms"


def check_keep(keep: float) -> None:
    """A fraction strictly between 0 and 1, or a whole count >= 1 (of any layer)."""
    if not math.isfinite(keep) or keep <= 0:
        raise CarpruneError(f"keep must be a fraction in (0, 1) or a count >= 1, got {keep}")
    if keep >= 1 and keep != int(keep):
        raise CarpruneError(f"keep {keep} is neither a fraction below 1 nor a whole count; "
                            "use e.g. 0.5 or 16")


def resolve_keep(keep: float, n: int, layer: str) -> int:
    """Filters to keep of the n in `layer`, for a keep that `check_keep` accepts."""
    check_keep(keep)
    if keep < 1:
        target = math.floor(keep * n + 0.5)
        if target < 1:
            raise CarpruneError(f"keep {keep} leaves no filter of the {n} in {layer!r}; use a "
                                f"fraction of at least {1 / (2 * n):.3f} or a count >= 1")
        return target
    if keep >= n:
        raise CarpruneError(f"keep {int(keep)} is not below the {n} filters of {layer!r}; "
                            f"choose a count under {n} or a fraction")
    return int(keep)


@dataclass(frozen=True)
class Approximation:
    """How far a run departs from exact greedy CAR; exact by default.

    step: units removed per re-scoring (1 is the paper's greedy); in block mode, blocks per
    round.
    screen: after the first full scoring, re-score only the `screen` units that rank first by
    their last exact scores (a cheap criterion: it costs nothing to compute).
    shortlist (global runs): every round, from the first, score exactly only the `shortlist`
    units that a first-order estimate of their absence (scoring/first_order.py) ranks first
    per saving.
    race (with shortlist): estimate and score the shortlist on the scoring set's first `race`
    images, then only its best 2 x step (the finalists) on all of them.
    blocks (global runs, for networks too big for a candidate per filter): every round, each
    layer offers one block, the fraction `blocks` of its units that the first-order estimate
    ranks least needed, scored jointly; the best `step` blocks go.
    """

    step: int = 1
    screen: int | None = None
    shortlist: int | None = None
    race: int | None = None
    blocks: float | None = None

    def __post_init__(self) -> None:
        if self.step < 1:
            raise CarpruneError(f"--step must be at least 1, got {self.step}")
        if self.screen is not None and self.screen < self.step:
            raise CarpruneError(f"--screen must be at least --step ({self.step}), got "
                                f"{self.screen}")
        self._check_shortlist()
        if self.blocks is not None and not 0 < self.blocks < 1:
            raise CarpruneError(f"--blocks must be a fraction in (0, 1) of each layer, got "
                                f"{self.blocks}")
        if self.blocks is not None and (self.screen, self.shortlist) != (None, None):
            raise CarpruneError("--blocks chooses what a round scores by itself; drop --screen "
                                "and --shortlist, or --blocks")

    def _check_shortlist(self) -> None:
        if self.race is not None and self.shortlist is None:
            raise CarpruneError("--race races a shortlist's units on a few images first; give "
                                "--shortlist M with it")
        if self.race is not None and self.race < 1:
            raise CarpruneError(f"--race takes a number of images, at least 1, got {self.race}")
        if self.shortlist is None:
            return
        if self.screen is not None:
            raise CarpruneError("give --shortlist or --screen, not both: both choose the units a "
                                "round scores")
        if self.shortlist < self.step:
            raise CarpruneError(f"--shortlist must be at least --step ({self.step}), got "
                                f"{self.shortlist}")

    @classmethod
    def per_layer(cls, step: int = 1, screen: int | None = None, shortlist: int | None = None,
                  race: int | None = None, blocks: float | None = None) -> Approximation:
        """A per-layer run's approximation, `step` and `screen`; what only a global run does is
        refused."""
        approx = cls(step, screen)
        if shortlist is not None or race is not None:
            raise CarpruneError(f"--shortlist and --race apply to global runs ({GLOBAL_TARGETS});"
                                " per layer, use --screen")
        if blocks is not None:
            raise CarpruneError(f"--blocks applies to global runs ({GLOBAL_TARGETS}); per layer, "
                                "use --step")
        return approx


@dataclass(frozen=True)
class Budget:
    """What a global run spends and how it ranks: `kind` (macs, params or latency) is what the
    target counts; `cost` is what a removal saves for the ranking (default: `kind`; latency:
    milliseconds per unit of each layer, measured once at the start). Guard rails: every layer
    keeps at least `min_keep` of its filters and never none, and a multiple of `round_to`
    (CPU and GPU convolutions run fastest on widths that fill their vector registers); the
    layers in `ignore` are left whole."""

    kind: str = "macs"
    cost: str | None = None
    min_keep: float = 0.1
    round_to: int = 1
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "cost", self.cost or self.kind)
        object.__setattr__(self, "ignore", tuple(self.ignore))
        for kind in (self.kind, self.cost):
            if kind not in BUDGET_KINDS:
                raise CarpruneError(f"unknown budget or cost {kind!r}; use macs, params or "
                                    "latency")
        if self.round_to < 1 or self.round_to != int(self.round_to):
            raise CarpruneError(f"--round-to must be a whole number >= 1, got {self.round_to}")
        if not 0 <= self.min_keep < 1:
            raise CarpruneError(f"--min-keep must be a fraction in [0, 1), got {self.min_keep}")

    def check_target(self, target: float) -> None:
        """A target of MACs or parameters is a fraction of the original; one of latency is in
        milliseconds, checked against the network's measured latency."""
        if self.kind != "latency" and not 0 < target < 1:
            raise CarpruneError(f"the target must be a fraction in (0, 1) of the original "
                                f"{self.kind}, got {target}")


def check_global(approx: Approximation, budget: Budget) -> None:
    """Refuse what a global run cannot do with these settings together."""
    if approx.blocks is not None and budget.round_to > 1:
        raise CarpruneError("--round-to keeps every layer a multiple of N filters, which blocks "
                            "of --blocks do not; drop one of the two")


@dataclass(frozen=True)
class Resume:
    """An interrupted run to go on from, and what to call on the way.

    done: the interrupted run's records ({layer: LayerRecord}) for a per-layer run, its
    GlobalProgress for a global one; its removals are replayed first.
    val_before: a per-layer run's scoring accuracy before its first removal.
    on_step: per layer, called with all records so far and the accuracy before, after every
    removal; global, with the GlobalProgress and the network, after every round (to save
    state, or measure or save the network on the way: its spec holds the removals so far).
    """

    done: dict[str, LayerRecord] | GlobalProgress | None = None
    val_before: float | None = None
    on_step: Callable | None = None

    def __post_init__(self) -> None:
        if self.on_step is not None and not callable(self.on_step):
            raise CarpruneError(f"on_step must be a function, got {type(self.on_step).__name__}")
