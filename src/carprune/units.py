"""What CAR scores and removes: a unit of a layer, and a block of them (groups.py says what a
unit holds)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    """Unit `channel` (current position; one channel, or one of each channel group) of the
    conv or linear layer `layer`."""

    layer: str
    channel: int

    @property
    def units(self) -> tuple[Unit, ...]:
        return (self,)


@dataclass(frozen=True)
class Block:
    """Units `channels` (current positions) of layer `layer`, whose absence is scored jointly:
    one candidate of global CAR's block mode."""

    layer: str
    channels: tuple[int, ...]

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(Unit(self.layer, c) for c in self.channels)
