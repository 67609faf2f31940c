"""Does CAR drop colour filters first in a real pretrained RGB network? MTCNN's ONet with the
weights that ship in facenet-pytorch's wheel (`make rgb`, `python -m experiments.rgb`;
docs/colour.md)."""
