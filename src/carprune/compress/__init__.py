"""After CAR: weight pruning, weight sharing, Huffman coding, honest sizes, export.

`compress_run` is the whole pipeline (Han et al., Deep Compression) on a filter-pruned
checkpoint; `load_carz` brings a compressed model back without pickle; `export_onnx` writes
the dense model for other runtimes. The file format is documented in `carz.py`.
"""

from .carz import load_carz as load_carz
from .carz import record_sizes as record_sizes
from .carz import write_carz as write_carz
from .export import export_onnx as export_onnx
from .huffman import code_lengths as code_lengths
from .kmeans import kmeans_1d as kmeans_1d
from .pipeline import compress_run as compress_run
from .pipeline import prune_weights as prune_weights
from .pipeline import size_table as size_table
