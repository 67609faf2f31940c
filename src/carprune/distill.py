"""Distillation from a teacher (the unpruned network, when fine-tuning a pruned one): the
teacher's softened outputs (Hinton, Vinyals & Dean 2015) and, where the pruned network kept
them whole, the features its classifier reads (a hint, as in Romero et al.'s FitNets 2015)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .devices import device_of
from .errors import CarpruneError

DISTILL_WEIGHT, TEMPERATURE = 0.9, 4.0  # Hinton et al.'s soft targets, as commonly set
HINT_WEIGHT = 10.0  # of the squared feature difference, relative to the teacher's features


def distilled(logits: torch.Tensor, teacher_logits: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
    """DISTILL_WEIGHT of the KL divergence from the teacher's outputs to the student's, both
    softened by TEMPERATURE (times its square, so that the gradients keep their scale), and the
    rest cross-entropy with the labels."""
    soft = F.kl_div(F.log_softmax(logits / TEMPERATURE, 1),
                    F.log_softmax(teacher_logits / TEMPERATURE, 1), log_target=True,
                    reduction="batchmean") * TEMPERATURE ** 2
    return DISTILL_WEIGHT * soft + (1 - DISTILL_WEIGHT) * F.cross_entropy(logits, y)


def hint(features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """The mean squared difference of the student's features from the teacher's, over the
    teacher's mean square (so HINT_WEIGHT does not depend on the features' scale)."""
    return F.mse_loss(features, teacher_features) / teacher_features.pow(2).mean().clamp_min(1e-12)


def read_features(model: nn.Module,
                  image: torch.Tensor) -> tuple[nn.Module | None, torch.Size | None, torch.Size]:
    """From one forward pass: the module whose input is the features the classifier reads (the
    last conv or linear layer to run, or the dropout that runs just before it, so that the
    features are taken before dropout's noise; None for a network without either), the shape
    of those features, and the shape of the network's output."""
    ran: list[tuple[nn.Module, torch.Size]] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_pre_hook(  # any leaf may be called with keywords or no tensor
        lambda m, args: ran.append((m, getattr(args[0], "shape", None) if args else None)))
        for m in leaves]
    try:
        with torch.no_grad():
            out = model.eval()(image.to(device_of(model)))
    finally:
        for h in hooks:
            h.remove()
    layers = [i for i, (m, _) in enumerate(ran) if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        return None, None, out.shape
    last = layers[-1]
    if last > 0 and isinstance(ran[last - 1][0], nn.modules.dropout._DropoutNd):
        last -= 1
    return *ran[last], out.shape


@contextlib.contextmanager
def inputs_of(modules: tuple[nn.Module, ...]) -> Iterator[list]:
    """While open, the list holds the input each of `modules` last received."""
    seen: list = [None] * len(modules)

    def keep(i: int):
        return lambda module, args: seen.__setitem__(i, args[0])

    hooks = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


@dataclass
class Teacher:
    """A network the model learns from as well as the labels; it is put in eval mode (its
    norms keep their statistics) and never trained. `reads`: the model's and the teacher's
    modules whose inputs are the classifier's features, when they have the same shape (no
    hint otherwise)."""

    net: nn.Module
    reads: tuple[nn.Module, nn.Module] | None

    @classmethod
    def check(cls, teacher: nn.Module, model: nn.Module, image: torch.Tensor) -> Teacher:
        """The teacher, after checking that it answers an image with as many outputs as the
        model."""
        mine, my_features, want = read_features(model, image)
        theirs, their_features, got = read_features(teacher, image)
        if got != want:
            raise CarpruneError(f"the teacher gives {tuple(got)} outputs for an image where "
                                f"the network gives {tuple(want)}; distil from a network with "
                                "the same classes (with --classes, the unpruned network "
                                "specialised)")
        same = my_features is not None and my_features == their_features
        return cls(teacher, (mine, theirs) if same else None)

    def loss(self, net: nn.Module, x: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the distilled loss plus HINT_WEIGHT of the hint, the model's logits) on a batch."""
        with inputs_of(self.reads or ()) as features:
            logits = net(x)
            with torch.no_grad():
                taught = self.net(x)
        loss = distilled(logits, taught, y)
        if self.reads is not None:
            loss = loss + HINT_WEIGHT * hint(*features)
        return loss, logits
