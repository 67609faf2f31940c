"""`model.carz`: a pruned, weight-shared and Huffman-coded model, rebuilt without pickle.

Layout (integers little-endian; sizes in bytes)::

    offset  size  field
    0       4     magic b"CARZ"
    4       1     format version (1)
    5       4     CRC-32 of every byte from offset 17 to the end of the file
    9       8     number of bytes from offset 17 to the end (so truncation is told apart)
    17      v     header length H, LEB128 varint
    ...     H     header: zlib-compressed UTF-8 JSON {"spec": ..., "tensors": [...]}
    ...           one record per name in "tensors", in that order

"spec" holds what `carprune.io.build` needs (architecture, input shape, data description,
`pruning_history`), so the file rebuilds the filter-pruned network, then fills its state dict;
"tensors" lists the state-dict names. A record is a LEB128 length L, then L bytes: a kind
byte, then the payload. The size of a layer in the file is the size of its record.

- kinds 1-5, raw: the tensor's bytes in its own dtype (float32, float16, bfloat16, int64,
  float64), numel taken from the rebuilt model. BatchNorm parameters and biases are stored so.
- kind 16, coded (a quantised conv/linear weight), a bit stream, most significant bit first:

      8 bits    k - 1, codebook size (1..256)
      k x 16    codebook, float16 bit patterns; value symbol i in 1..k means codebook[i - 1],
                value symbol 0 is a filler zero
      3 bits    g - 1, gap width g (1..8): a gap is the number of zeros skipped before an
                entry, 0..2**g - 1; longer runs get filler zeros (Han et al.)
      gamma     m + 1, Elias gamma: m entries (nonzero weights and fillers)
      table     value code: lengths of the canonical Huffman codes of symbols 0..k
      g bits    n - 1: the gap alphabet is 0..n - 1 (n - 1 = the largest gap used)
      table     gap code: lengths of symbols 0..n - 1
      m codes   gaps, then m codes: values
      (a table is 3 bits w, then one w-bit length per symbol; 0 = the symbol never occurs)

  Weights after the last entry are zero. The encoder tries every g and keeps the shortest.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CarpruneError
from ..io import atomic_write, build, check_state_fits, load_state, spec_of
from .huffman import BitReader, BitWriter, code_lengths

MAGIC = b"CARZ"
VERSION = 1
PREAMBLE = struct.Struct("<4sBIQ")
RAW_KINDS = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.int64,
             5: torch.float64}
CODED = 16
SPEC_KEYS = ("arch", "input_shape", "data", "pruning_history")
MAX_CODEBOOK = 256
GAP_WIDTHS = range(1, 9)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("a record length runs past the end of the file")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


# -- coded weights ------------------------------------------------------------------------

def encode_weight(weight: torch.Tensor, name: str = "weight") -> bytes:
    """The coded payload of a weight holding at most 256 distinct nonzero float16 values."""
    flat = weight.detach().flatten().float()
    positions = (flat != 0).nonzero().flatten().numpy()
    values = flat[positions]
    if not torch.equal(values.half().float(), values):
        raise CarpruneError(f"{name} holds values that float16 cannot represent exactly; "
                            "quantise it (carprune.compress) before writing a .carz file")
    codebook, symbols = np.unique(values.half().numpy(), return_inverse=True)
    if not len(codebook):               # an all-zero weight still gets a one-entry codebook
        codebook = np.zeros(1, np.float16)
    if len(codebook) > MAX_CODEBOOK:
        raise CarpruneError(f"{name} has {len(codebook)} distinct nonzero values, more than "
                            f"{MAX_CODEBOOK}; quantise it to at most 8 bits first")
    gaps = np.diff(positions, prepend=-1) - 1
    return min((_encode_entries(codebook, symbols + 1, gaps, g) for g in GAP_WIDTHS), key=len)


def _encode_entries(codebook: np.ndarray, symbols: np.ndarray, gaps: np.ndarray,
                    g: int) -> bytes:
    span = 2 ** g                       # a filler zero skips span - 1 zeros and takes one place
    fillers = gaps // span
    last = np.cumsum(fillers + 1) - 1   # each nonzero's place among all entries
    m = int(last[-1]) + 1 if len(last) else 0
    entry_gaps = np.full(m, span - 1)
    entry_values = np.zeros(m, np.int64)
    entry_gaps[last] = gaps % span
    entry_values[last] = symbols
    k = len(codebook)
    w = BitWriter()
    w.write(k - 1, 8)
    for pattern in codebook.view(np.uint16).tolist():
        w.write(pattern, 16)
    w.write(g - 1, 3)
    w.gamma(m + 1)
    value_lengths = code_lengths(np.bincount(entry_values, minlength=k + 1))
    w.table(value_lengths)
    n = int(entry_gaps.max()) + 1 if m else 1
    w.write(n - 1, g)
    gap_lengths = code_lengths(np.bincount(entry_gaps, minlength=n))
    w.table(gap_lengths)
    w.symbols(entry_gaps, gap_lengths)
    w.symbols(entry_values, value_lengths)
    return w.getvalue()


def _read_entries(payload: bytes):
    """The codebook, gaps and value symbols of a coded payload, and the bits each part took."""
    r = BitReader(payload)
    k = r.read(8) + 1
    codebook = np.array([r.read(16) for _ in range(k)], np.uint16).view(np.float16)
    bits = {"codebook": r.position}
    g = r.read(3) + 1
    m = r.gamma() - 1
    value_lengths = r.table(k + 1)
    n = r.read(g) + 1
    gap_lengths = r.table(n)
    bits["code tables"] = r.position - bits["codebook"]
    gaps = r.symbols(m, gap_lengths)
    bits["gaps"] = r.position - sum(bits.values())
    values = r.symbols(m, value_lengths)
    bits["values"] = r.position - sum(bits.values())
    bits["padding"] = 8 * len(payload) - r.position
    return codebook, gaps, values, bits


def decode_weight(payload: bytes, shape: torch.Size) -> torch.Tensor:
    codebook, gaps, values, _ = _read_entries(payload)
    m = len(gaps)
    positions = np.cumsum(gaps + 1) - 1
    numel = int(np.prod(shape))
    if m and positions[-1] >= numel:
        raise ValueError(f"entries run past the {numel} weights of the tensor")
    table = np.concatenate([np.zeros(1, np.float32), codebook.astype(np.float32)])
    flat = np.zeros(numel, np.float32)
    flat[positions] = table[values]
    return torch.from_numpy(flat).view(shape)


# -- the file ------------------------------------------------------------------------------

def write_carz(path: str | os.PathLike, model: nn.Module, coded: Iterable[str]) -> None:
    """Write the model's whole state dict; the weights named in `coded` are Huffman-coded and
    must already be quantised (<= 256 distinct float16 values), everything else is raw."""
    state, coded = model.state_dict(), set(coded)
    unknown = sorted(coded - set(state))
    if unknown:
        raise CarpruneError(f"the model has no tensor {unknown[0]!r} to code; name state-dict "
                            "entries such as conv1.weight")
    spec = {key: value for key, value in spec_of(model).items() if key in SPEC_KEYS}
    header = zlib.compress(json.dumps({"spec": spec, "tensors": list(state)},
                                      separators=(",", ":")).encode(), 9)
    body = bytearray(_varint(len(header)) + header)
    raw_codes = {dtype: kind for kind, dtype in RAW_KINDS.items()}
    for name, tensor in state.items():
        if name in coded:
            record = bytes([CODED]) + encode_weight(tensor, name)
        elif tensor.dtype in raw_codes:
            record = bytes([raw_codes[tensor.dtype]]) + \
                tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        else:
            raise CarpruneError(f"{name} is a {tensor.dtype} tensor, which .carz files do not "
                                "store; convert the model to float32")
        body += _varint(len(record)) + record
    atomic_write(path, PREAMBLE.pack(MAGIC, VERSION, zlib.crc32(body), len(body)) + body)


def _read_body(path: Path) -> bytes:
    """The verified bytes after the preamble, or a CarpruneError naming what is wrong."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CarpruneError(f"{path} does not exist; give a model.carz written by carprune "
                            "compress") from None
    except IsADirectoryError:
        raise CarpruneError(f"{path} is a directory; give the model.carz file inside it") from None
    redo = "re-run carprune compress or copy the file again"
    if len(data) < PREAMBLE.size or data[:4] != MAGIC:
        raise CarpruneError(f"{path} is not a .carz file (bad magic number); give a model.carz "
                            "written by carprune compress")
    _, version, crc, length = PREAMBLE.unpack_from(data)
    if version != VERSION:
        raise CarpruneError(f"{path} is .carz version {version}, this carprune reads version "
                            f"{VERSION}; use the carprune release that wrote it")
    body = data[PREAMBLE.size:]
    if len(body) != length:
        raise CarpruneError(f"{path} is truncated or padded ({len(data)} bytes, expected "
                            f"{PREAMBLE.size + length}); {redo}")
    if zlib.crc32(body) != crc:
        raise CarpruneError(f"{path} is damaged (CRC-32 mismatch); {redo}")
    return body


def _records(body: bytes) -> tuple[dict, list[tuple[int, int]]]:
    """The header and the (start, end) of every record, lengths included, in file order."""
    size, pos = _read_varint(body, 0)
    header = json.loads(zlib.decompress(body[pos:pos + size]))
    pos += size
    spans = []
    while pos < len(body):
        start = pos
        size, pos = _read_varint(body, pos)
        pos += size
        if pos > len(body):
            raise ValueError("the last record runs past the end of the file")
        spans.append((start, pos))
    if len(spans) != len(header["tensors"]):
        raise ValueError(f"{len(spans)} records for {len(header['tensors'])} tensors")
    return header, spans


def record_sizes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes each tensor takes in the file (its whole record), by state-dict name."""
    path = Path(path)
    try:
        header, spans = _records(_read_body(path))
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise CarpruneError(f"{path} has a valid checksum but cannot be parsed ({exc}); "
                            "re-run carprune compress") from None
    return {name: end - start for name, (start, end) in zip(header["tensors"], spans,
                                                             strict=True)}


def coded_breakdown(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Where the bytes of each coded weight's record go: its record framing (length and kind),
    codebook, code tables, gap codes, value codes and final padding, read back from the file."""
    body = _read_body(Path(path))
    header, spans = _records(body)
    parts = {}
    for name, (start, end) in zip(header["tensors"], spans, strict=True):
        _, pos = _read_varint(body, start)
        if body[pos] != CODED:
            continue
        bits = _read_entries(body[pos + 1:end])[3]
        parts[name] = {"framing": pos + 1 - start, **{k: v / 8 for k, v in bits.items()}}
    return parts


def load_carz(path: str | os.PathLike) -> nn.Module:
    """The model stored in a .carz file, rebuilt from its spec and ready to run (eval mode)."""
    path = Path(path)
    body = _read_body(path)
    try:
        header, spans = _records(body)
        model = build(header["spec"])
        expected = model.state_dict()
        state = {}
        for name, (start, end) in zip(header["tensors"], spans, strict=True):
            _, pos = _read_varint(body, start)
            kind, payload = body[pos], body[pos + 1:end]
            if name not in expected:
                raise ValueError(f"the rebuilt model has no tensor {name}")
            shape = expected[name].shape
            if kind == CODED:
                state[name] = decode_weight(payload, shape)
            elif payload:
                state[name] = torch.frombuffer(bytearray(payload), dtype=RAW_KINDS[kind]) \
                    .reshape(shape)
            else:
                state[name] = torch.empty(shape, dtype=RAW_KINDS[kind])
    except (ValueError, KeyError, TypeError, RuntimeError, EOFError, zlib.error) as exc:
        raise CarpruneError(f"{path} has a valid checksum but cannot be decoded ({exc}); "
                            "re-run carprune compress with this carprune version") from None
    check_state_fits(model, state, path)
    load_state(model, state)
    return model.eval()
