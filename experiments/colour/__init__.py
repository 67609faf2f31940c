"""Does CAR drop colour filters first? The controlled case: tinted Fashion-MNIST and the convnet
trained on it (`python -m experiments.colour`; docs/colour.md)."""
