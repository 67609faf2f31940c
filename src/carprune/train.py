"""Training and fine-tuning: SGD with momentum, one-cycle schedule, light augmentation, and
optionally distillation from a teacher (distill.py)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from . import dist
from .devices import device_of
from .distill import Teacher
from .errors import CarpruneError
from .layout import arrange, arranged, layout_for


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels and random horizontal flip, on a whole batch."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(x.shape[1]).view(1, -1, 1, 1),
                 rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    per_class: list[float]
    correct: int
    total: int


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int | None = None,
             batch_size: int = 256, workers: int = 0) -> Evaluation:
    """Accuracy, mean cross-entropy and per-class accuracy of `model` on a labelled data set,
    on the model's device; images on disk stream through `workers` DataLoader processes."""
    if len(dataset) == 0:
        raise CarpruneError("the evaluation set is empty; give a data set with images")
    model.eval()
    device = device_of(model)
    layout = layout_for(model, first_image(dataset))
    loss, preds, labels = 0.0, [], []
    for x, y in _batches(dataset, batch_size, workers):
        logits = model(arranged(x.to(device), layout))
        loss += float(F.cross_entropy(logits.float(), y.to(device), reduction="sum"))
        preds.append(logits.argmax(1).cpu())
        labels.append(y)
    pred, y_all = torch.cat(preds), torch.cat(labels)
    correct = int((pred == y_all).sum())
    k = num_classes or int(y_all.max()) + 1
    hits = torch.bincount(y_all[pred == y_all], minlength=k).double()
    counts = torch.bincount(y_all, minlength=k).double().clamp(min=1)
    return Evaluation(correct / len(y_all), loss / len(y_all), (hits / counts).tolist(),
                      correct, len(y_all))


def first_image(dataset: Dataset) -> torch.Tensor:
    """The data set's first image as a batch of one: what a layout is decided on."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][:1]
    return torch.as_tensor(dataset[0][0]).unsqueeze(0)


def _batches(dataset: Dataset, batch_size: int, workers: int):
    """In-memory tensors sliced in order; anything else through a DataLoader."""
    if isinstance(dataset, TensorDataset):
        x_all, y_all = dataset.tensors
        return ((x_all[i:i + batch_size], y_all[i:i + batch_size])
                for i in range(0, len(y_all), batch_size))
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers)


@dataclass
class TrainState:
    """What an interrupted training needs to continue bit-identically after `epoch` epochs."""

    epoch: int
    optimizer: dict
    generator: torch.Tensor
    torch_rng: torch.Tensor
    log: list[dict]


@dataclass(frozen=True)
class Recipe:
    """How `fit` trains: the peak learning rate of SGD's one-cycle schedule, the batch size,
    weight decay and seed.

    shift_and_flip: augment every batch (`augment`); off where the data set applies its own
    random transform (image folders: random resized crop and flip, in `workers` DataLoader
    processes).
    teacher: a network with the model's outputs (the unpruned one, when fine-tuning a pruned
    network), kept as it is; the model learns its softened outputs and its classifier's
    features as well as the labels (distill.py).
    """

    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 5e-4
    seed: int = 0
    shift_and_flip: bool = True
    workers: int = 0
    teacher: nn.Module | None = None

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.batch_size >= 1 and self.weight_decay >= 0
                and self.workers >= 0):
            raise CarpruneError(f"a training recipe needs a positive learning rate and batch "
                                f"size and no negative weight decay or workers, got lr "
                                f"{self.lr}, batch size {self.batch_size}, weight decay "
                                f"{self.weight_decay}, workers {self.workers}")


def fit(model: nn.Module, train: Dataset, epochs: int, recipe: Recipe = Recipe(),
        val: Dataset | None = None, progress: bool = True, desc: str = "train",
        resume: TrainState | None = None,
        on_epoch: Callable[[TrainState], None] | None = None) -> list[dict]:
    """Train in place with SGD + Nesterov momentum under a one-cycle schedule, on the model's
    device, as `recipe` says; returns a log. `on_epoch` receives the state after every epoch;
    passing it back as `resume` (with the model's weights of that moment) continues exactly as
    if never stopped.
    """
    if epochs <= 0:
        return []
    if len(train) == 0:
        raise CarpruneError("the training set is empty; give a data set with images")
    image = first_image(train)  # before seeding: reading it may draw
    layout = arrange(model, image)
    teacher = None if recipe.teacher is None else Teacher.check(recipe.teacher, model, image)
    seed = recipe.seed
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader, sampler = _loader(train, recipe.batch_size, seed, generator, recipe.workers)
    device = device_of(model)
    net = model
    if dist.active():  # each rank a share of every global batch; DDP averages the gradients
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                      else None)
    opt, sched = _optimizer(model, recipe.lr, recipe.weight_decay, epochs, len(loader))
    log, first = _restore(resume, opt, sched, generator, len(loader))
    for epoch in range(first, epochs + 1):
        if sampler is not None:  # per-epoch, per-rank seeds: resumable without saved RNG state
            sampler.set_epoch(epoch)
            generator.manual_seed(seed + 1000 * epoch + dist.rank())
            torch.manual_seed(seed + 1000 * epoch + dist.rank())
        step = _Step(net, opt, sched, generator if recipe.shift_and_flip else None, device,
                     layout, teacher)
        entry = {"epoch": epoch, **_epoch(step, loader, f"{desc} epoch {epoch}/{epochs}",
                                          progress)}
        if not math.isfinite(entry["train_loss"]):
            raise CarpruneError(f"training diverged at epoch {epoch} (loss is not finite); "
                                "lower the learning rate or check the data for NaN")
        if val is not None:
            entry["val_accuracy"] = evaluate(model, val, workers=recipe.workers).accuracy
        log.append(entry)
        if progress and dist.is_main():
            tqdm.write(f"{desc} epoch {epoch}/{epochs}: loss {entry['train_loss']:.4f}, "
                       f"train acc {entry['train_accuracy']:.4f}"
                       + (f", val acc {entry['val_accuracy']:.4f}" if val is not None else "")
                       + f" ({entry['seconds']:.0f} s)")
        if on_epoch is not None:
            on_epoch(TrainState(epoch, opt.state_dict(), generator.get_state(),
                                torch.get_rng_state(), list(log)))
    model.eval()
    return log


def _loader(train: Dataset, batch_size: int, seed: int, generator: torch.Generator,
            workers: int) -> tuple[DataLoader, DistributedSampler | None]:
    """Shuffled batches; under torch.distributed each rank a share of every global batch."""
    if dist.active():
        sampler = DistributedSampler(train, dist.world(), dist.rank(), shuffle=True, seed=seed,
                                     drop_last=True)
        return DataLoader(train, batch_size=max(1, batch_size // dist.world()), sampler=sampler,
                          drop_last=True, num_workers=workers), sampler
    return DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator,
                      drop_last=len(train) > batch_size, num_workers=workers), None


def _optimizer(model: nn.Module, lr: float, weight_decay: float, epochs: int, steps: int):
    """SGD with Nesterov momentum (no decay on biases and norms), one-cycle schedule; a run
    of one or two steps, too short to warm up and anneal (a one-cycle schedule would take its
    last step at lr / 25 / 10^4), at the learning rate throughout."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    if epochs * steps < 3:
        return opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    # a quarter of the steps warms up; at least 1.5 (OneCycleLR divides by zero at exactly 1)
    warmup = min(0.75, max(0.25, 1.5 / (epochs * steps)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs,
                                                steps_per_epoch=steps, pct_start=warmup)
    return opt, sched


def _restore(resume: TrainState | None, opt, sched, generator: torch.Generator,
             steps: int) -> tuple[list[dict], int]:
    """(log so far, first epoch to run): an interrupted run's optimizer, schedule and RNGs."""
    if resume is None:
        return [], 1
    with warnings.catch_warnings():  # replaying the schedule without optimizer steps
        warnings.simplefilter("ignore")
        for _ in range(resume.epoch * steps):
            sched.step()
    opt.load_state_dict(resume.optimizer)
    generator.set_state(resume.generator)
    torch.set_rng_state(resume.torch_rng)
    return list(resume.log), resume.epoch + 1


@dataclass
class _Step:
    """One optimizer step on a batch: augment (when a generator is given), forward, backward;
    the loss is cross-entropy, or the teacher's (distill.py) when there is one."""

    net: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator | None
    device: torch.device
    layout: torch.memory_format  # the network's (layout.py)
    teacher: Teacher | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.generator is not None:
            x = augment(x, self.generator)
        x = arranged(x.to(self.device), self.layout)
        y = y.to(self.device)
        if self.teacher is None:
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
        else:
            loss, logits = self.teacher.loss(self.net, x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.detach(), (logits.argmax(1) == y).sum()


def _epoch(step: _Step, loader: DataLoader, desc: str, progress: bool) -> dict:
    step.net.train()
    start, seen, total_loss, correct = time.perf_counter(), 0, 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not (progress and dist.is_main()),
               mininterval=1, leave=False, unit="batch")
    for x, y in bar:
        loss, hits = step(x, y)
        seen += len(y)
        total_loss += float(loss) * len(y)
        correct += int(hits)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"train_loss": total_loss / seen, "train_accuracy": correct / seen,
            "seconds": time.perf_counter() - start}
