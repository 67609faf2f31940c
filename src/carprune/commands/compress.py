"""`carprune compress`: weight pruning, k-means sharing and Huffman coding into model.carz
(compress/pipeline.py prints the size table), optionally checked ONNX export."""

from __future__ import annotations

from pathlib import Path

from ..compress import compress_run, export_onnx, load_carz
from ..config import CompressConfig
from ..data import load_data


def run(config: CompressConfig) -> dict:
    out = Path(config.out)
    report = compress_run(config.checkpoint, load_data(config.data, config.data_dir), out,
                          weight_sparsity=config.weight_sparsity, bits=config.bits,
                          finetune_epochs=config.finetune_epochs,
                          prune_rounds=config.prune_rounds, baseline=config.baseline,
                          layer_sparsity=dict(config.layer_sparsity or []),
                          layer_bits=dict(config.layer_bits or []))
    if config.onnx:
        model = load_carz(out / "model.carz")
        diff = export_onnx(model, out / "model.onnx", model.carprune_spec["input_shape"])
        if diff is not None:  # None: export_onnx already said onnxruntime is missing
            print(f"wrote {out / 'model.onnx'}; onnxruntime matches PyTorch "
                  f"(max abs diff {diff:.1e})")
    return report
