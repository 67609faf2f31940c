"""The paper's experiment on pretrained ImageNet networks whose weights ship in packages
(`make real`, `python -m experiments.real`; docs/real.md)."""
