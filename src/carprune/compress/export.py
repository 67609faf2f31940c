"""ONNX export of a (pruned, dense) model, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..classes import output_names, outputs_of
from ..errors import CarpruneError
from ..io import atomic_write

ONNX_EXTRA = "pip install 'carprune[onnx]' (onnx, onnxscript, onnxruntime)"


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: Sequence[int],
                atol: float = 1e-4, seed: int = 0) -> float | None:
    """Write the model as ONNX with a free batch dimension; returns the largest absolute
    difference between onnxruntime's and PyTorch's outputs on a random batch, or None (with a
    warning) when onnxruntime is not installed and the file is written unchecked. The names of
    its outputs' classes go into the file's metadata (`classes`, a JSON list; a specialised
    network's `class_indices` too), so a program reading it knows what each logit is.

    A difference above `atol` is an error and writes nothing.
    """
    model = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *input_shape, generator=generator)
    try:
        with warnings.catch_warnings():  # the exporter's own deprecation notices, not ours
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False,
                                        input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=({0: "batch"},))
    except ModuleNotFoundError as exc:
        raise CarpruneError(f"ONNX export needs {exc.name}; {ONNX_EXTRA}") from None
    proto = program.model_proto
    for key, value in _class_metadata(model, example).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    try:
        import onnxruntime
    except ModuleNotFoundError:
        atomic_write(path, data)
        warnings.warn(f"onnxruntime is not installed, so {path} was written without checking "
                      f"it against PyTorch; {ONNX_EXTRA}", stacklevel=2)
        return None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    batch = torch.randn(8, *input_shape, generator=generator)
    with torch.inference_mode():
        expected = model(batch).numpy()
    got = session.run(None, {"images": batch.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if not diff <= atol:
        raise CarpruneError(f"the ONNX model's outputs differ from PyTorch's by {diff:.2e} "
                            f"(more than {atol:g}); export with another torch version or report "
                            "this model")
    atomic_write(path, data)
    return diff


def _class_metadata(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """The ONNX metadata naming the logits, where the model's spec names them all."""
    names = output_names(model)
    if names is None or len(names) != outputs_of(model, example):
        return {}
    indices = model.carprune_spec.get("class_indices")
    return {"classes": json.dumps(names),
            **({"class_indices": json.dumps(indices)} if indices is not None else {})}
