"""Global CAR against Torch-Pruning's global magnitude pruning at the same MACs, with the same
fine-tuning (`python -m experiments.global_vs_magnitude`; docs/global-vs-magnitude.md)."""
