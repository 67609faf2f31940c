"""`carprune train`: fit a zoo model and write a checkpoint with the command that made it."""

from __future__ import annotations

import time

import torch

from .. import io
from ..config import TrainConfig
from ..data import load_data
from ..devices import resolve_device
from ..models import create_model
from ..train import Recipe, evaluate, fit
from .common import command_line, refuse_existing_output, table


def run(config: TrainConfig) -> dict:
    data = load_data(config.data, config.data_dir, image_size=config.image_size,
                     workers=config.workers)
    c, h, _ = data.input_shape
    kwargs = {"in_channels": c, "num_classes": data.num_classes}
    if config.model == "convnet":
        kwargs["input_size"] = h
    model = create_model(config.model, **kwargs).to(resolve_device(config.device))
    model.carprune_spec = {"arch": {"name": config.model, "kwargs": kwargs}}
    io.attach_data(model, data)
    refuse_existing_output(config.out)
    start = time.perf_counter()
    log = fit(model, data.train, config.epochs,
              Recipe(lr=config.lr, batch_size=config.batch_size, seed=config.seed,
                     shift_and_flip=data.augment, workers=data.workers), val=data.val)
    seconds = time.perf_counter() - start
    test = evaluate(model, data.test, data.num_classes, workers=data.workers)
    val = evaluate(model, data.val, data.num_classes, workers=data.workers)
    training = {"command": command_line(), "config": config.to_json(), "epochs": log,
                "seconds": seconds, "test_accuracy": test.accuracy,
                "val_accuracy": val.accuracy, "torch": torch.__version__,
                "threads": torch.get_num_threads()}
    io.save(model, config.out, extra={"training": training})
    print(table([[config.model, config.epochs, f"{seconds / max(config.epochs, 1):.1f}",
                  f"{val.accuracy:.4f}", f"{test.accuracy:.4f}"]],
                ["model", "epochs", "s/epoch", "val acc", "test acc"]))
    print(f"checkpoint written to {config.out}")
    return training
