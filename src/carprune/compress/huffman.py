"""Canonical Huffman coding of small integer alphabets, and the bit streams that carry it.

Canonical codes are fixed by their lengths alone (shorter codes first, ties by symbol), so a
table costs one length per symbol instead of the codes themselves: what matters when a layer
has only a few dozen weights.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

MAX_LENGTH_WIDTH = 7  # a table's length fields are 1..7 bits wide: code lengths up to 127


def code_lengths(counts: Sequence[int]) -> list[int]:
    """Huffman code length of every symbol; 0 for symbols that never occur.

    Merges the two lightest subtrees until one is left (ties: the subtree holding the smallest
    symbol first, so the result never depends on heap internals). A lone symbol gets 1 bit.
    """
    heap = [(int(c), s, [s]) for s, c in enumerate(counts) if c > 0]
    lengths = [0] * len(counts)
    if len(heap) == 1:
        lengths[heap[0][1]] = 1
        return lengths
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, s1, group1 = heapq.heappop(heap)
        c2, s2, group2 = heapq.heappop(heap)
        for s in group1 + group2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, min(s1, s2), group1 + group2))
    return lengths


def canonical_codes(lengths: Sequence[int]) -> dict[int, str]:
    """symbol -> code as a string of '0'/'1', for every symbol with a nonzero length."""
    codes, code, previous = {}, 0, 0
    for length, symbol in sorted((n, s) for s, n in enumerate(lengths) if n > 0):
        code <<= length - previous
        codes[symbol] = format(code, f"0{length}b")
        code, previous = code + 1, length
    return codes


class BitWriter:
    """Collects bits most significant first; `getvalue` pads the last byte with zeros."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def write(self, value: int, width: int) -> None:
        if width:
            self._parts.append(format(value, f"0{width}b"))

    def gamma(self, n: int) -> None:
        """Elias gamma code of n >= 1: short for small counts, unbounded for large ones."""
        self._parts.append("0" * (n.bit_length() - 1) + format(n, "b"))

    def table(self, lengths: Sequence[int]) -> None:
        """A code table: the width of a length field (3 bits), then every symbol's length."""
        width = max(1, max(lengths, default=0).bit_length())
        if width > MAX_LENGTH_WIDTH:
            raise ValueError(f"a code length of {max(lengths)} bits does not fit the table")
        self.write(width, 3)
        self._parts += [format(n, f"0{width}b") for n in lengths]

    def symbols(self, symbols: np.ndarray, lengths: Sequence[int]) -> None:
        codes = canonical_codes(lengths)
        self._parts.append("".join(codes[s] for s in symbols.tolist()))

    def getvalue(self) -> bytes:
        bits = "".join(self._parts)
        bits += "0" * (-len(bits) % 8)
        return np.packbits(np.frombuffer(bits.encode(), np.uint8) - ord("0")).tobytes()


class BitReader:
    """Reads what a BitWriter wrote; running past the end raises EOFError."""

    def __init__(self, data: bytes) -> None:
        self._bits = (np.unpackbits(np.frombuffer(data, np.uint8)) + ord("0")).tobytes().decode()
        self._pos = 0

    def _take(self, width: int) -> str:
        end = self._pos + width
        if end > len(self._bits):
            raise EOFError("the bit stream ends early")
        chunk, self._pos = self._bits[self._pos:end], end
        return chunk

    @property
    def position(self) -> int:
        """Bits read so far."""
        return self._pos

    def read(self, width: int) -> int:
        return int(self._take(width), 2) if width else 0

    def gamma(self) -> int:
        zeros = 0
        while self._take(1) == "0":
            zeros += 1
        return (1 << zeros) | self.read(zeros)

    def table(self, n: int) -> list[int]:
        width = self.read(3)
        return [self.read(width) for _ in range(n)]

    def symbols(self, count: int, lengths: Sequence[int]) -> np.ndarray:
        """Decode `count` symbols of the canonical code with these lengths."""
        lookup = {code: s for s, code in canonical_codes(lengths).items()}
        longest = max(lengths, default=0)
        out = np.empty(count, np.int64)
        bits, pos = self._bits, self._pos
        for i in range(count):
            end = pos + 1
            while bits[pos:end] not in lookup:
                if end - pos >= longest or end >= len(bits):
                    raise EOFError("the bit stream holds no valid code here")
                end += 1
            out[i] = lookup[bits[pos:end]]
            pos = end
        self._pos = pos
        return out
