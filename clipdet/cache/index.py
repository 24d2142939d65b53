"""The columnar index: what each segment holds, as numpy arrays (≈40 bytes per row, no per-image objects).

Keys are SHA-256 digests as 32 raw bytes; lookups go through the first 8 bytes as a big-endian
uint64 (`k64`, sorted, searched with np.searchsorted) confirmed against the full 32 bytes. A segment
is immutable, so its index is built once per process and kept while the segment lives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Set
from dataclasses import dataclass, field

import numpy as np

from ..errors import CacheError

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_CHUNK = 1 << 16


def hex_to_raw(hexes: np.ndarray) -> np.ndarray:
    """S64 hex digests → (n, 32) uint8 raw digests; rows that are not 64 hex chars come back as all-255
    (no valid digest starts with 8 bytes of 0xff followed by the same pattern, so callers can test `valid`)."""
    hexes = np.asarray(hexes, dtype="S64")
    out = np.empty((len(hexes), 32), dtype=np.uint8)
    for s in range(0, len(hexes), _CHUNK):
        v = _HEX[hexes[s:s + _CHUNK].view(np.uint8).reshape(-1, 64)]
        bad = (v == 255).any(axis=1)
        raw = (v[:, 0::2] << 4) | v[:, 1::2]
        raw[bad] = 255
        out[s:s + _CHUNK] = raw
    return out


def valid_raw(raw: np.ndarray) -> np.ndarray:
    """Mask of rows hex_to_raw could decode."""
    return ~(raw == 255).all(axis=1)


def raw_to_k64(raw: np.ndarray) -> np.ndarray:
    """(n, 32) raw digests → a uint64 search key: the XOR of the digest's four 8-byte words (uniform
    for real digests, and distinct for hand-made ones that differ only in their last bytes)."""
    w = np.ascontiguousarray(raw).view(np.uint64).reshape(-1, 4)
    return (w[:, 0] ^ w[:, 1] ^ w[:, 2] ^ w[:, 3]).astype(np.uint64)


def hex_order(raw: np.ndarray) -> np.ndarray:
    """Permutation sorting raw digests as their hex strings sort."""
    w = np.ascontiguousarray(raw).view(">u8").reshape(-1, 4)
    first = w[:, 0].astype(np.uint64)
    o = np.argsort(first, kind="stable")
    if len(o) > 1 and (first[o][1:] == first[o][:-1]).any():  # digests sharing 8 leading bytes
        o = np.lexsort((w[:, 3], w[:, 2], w[:, 1], w[:, 0]))
    return o


def raw_to_hex(raw: np.ndarray) -> list[str]:
    """(n, 32) raw digests → hex strings."""
    return [bytes(r).hex() for r in raw]


def keys_of(shas: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hex strings → (k64, raw) arrays; raises CacheError on a malformed digest."""
    arr = np.array([s.encode() if isinstance(s, str) else s for s in shas], dtype="S64")
    raw = hex_to_raw(arr)
    if len(raw) and not valid_raw(raw).all():
        bad = arr[~valid_raw(raw)][0].decode(errors="replace")
        raise CacheError(f"not a SHA-256 hex digest: {bad!r}")
    return raw_to_k64(raw), raw


@dataclass
class KeyTable:
    """Sorted keys of one table (a segment's images or one feature group) and their row numbers."""

    k64: np.ndarray          # sorted uint64
    raw: np.ndarray          # (n, 32) uint8, same order
    row: np.ndarray | None   # int64 row numbers in the file (None: positions are the rows)

    @classmethod
    def build(cls, hexes: np.ndarray) -> KeyTable:
        """From the S64 column as stored (file order)."""
        raw = hex_to_raw(hexes)
        k64 = raw_to_k64(raw)
        order = np.argsort(k64, kind="stable")
        return cls(k64[order], raw[order], order.astype(np.int64))

    def __len__(self) -> int:
        return len(self.k64)

    def _row(self, pos: np.ndarray) -> np.ndarray:
        return pos if self.row is None else self.row[pos]

    def save(self, g) -> None:
        """Store the table in HDF5 group `g` as `_index_k64`, `_index_raw`, `_index_row` (a search index
        next to the data: readers load it instead of decoding and sorting every hash)."""
        g.create_dataset("_index_k64", data=self.k64)
        g.create_dataset("_index_raw", data=self.raw)
        g.create_dataset("_index_row", data=self.row.astype(np.uint32 if len(self.row) < 2**32 else np.int64))

    @classmethod
    def load(cls, g, n: int) -> KeyTable | None:
        """The table stored by `save` in group `g` (None when absent or not of `n` rows)."""
        if "_index_k64" not in g or len(g["_index_k64"]) != n:
            return None
        return cls(g["_index_k64"][()], g["_index_raw"][()], g["_index_row"][()].astype(np.int64))

    def damage(self) -> str | None:
        """Why this (stored) table cannot be trusted, or None: keys sorted, each the XOR of its digest's
        words, row numbers a permutation of the file's rows. Any one flipped bit breaks one of these.
        O(n) numpy, the cost of loading the table."""
        n = len(self.k64)
        if len(self.raw) != n or (self.row is not None and len(self.row) != n):
            return "columns of different lengths"
        if n > 1 and not bool(np.all(self.k64[1:] >= self.k64[:-1])):
            return "keys out of order"
        if not np.array_equal(raw_to_k64(self.raw), self.k64):
            return "keys do not match their digests"
        if self.row is not None and n:
            if self.row.min() < 0 or self.row.max() >= n:
                return "row number out of range"
            seen = np.zeros(n, bool)
            seen[self.row] = True
            if not seen.all():
                return "row number repeated"
        return None

    def mismatched_rows(self, column: np.ndarray) -> np.ndarray:
        """File rows whose stored sha256 (`column`, S64 in file order) is not the digest this table
        gives them: a damaged hash column (or index). Sorted row numbers."""
        raw = hex_to_raw(column)
        rows = self._row(np.arange(len(self.k64)))
        bad = (raw[rows] != self.raw).any(axis=1)
        return np.sort(rows[bad])

    def find(self, k64: np.ndarray, raw: np.ndarray) -> np.ndarray:
        """Row number of each query key, -1 where absent (first row on duplicate keys)."""
        out = np.full(len(k64), -1, dtype=np.int64)
        if not len(self.k64) or not len(k64):
            return out
        if len(k64) > 256 and not np.all(k64[1:] >= k64[:-1]):  # sorted needles search cache-friendly
            o = np.argsort(k64, kind="stable")
            out[o] = self.find(k64[o], np.ascontiguousarray(raw[o]))
            return out
        lo = np.searchsorted(self.k64, k64, side="left")
        hi = np.searchsorted(self.k64, k64, side="right")
        run = hi - lo
        one = np.flatnonzero(run == 1)
        mine, theirs = self.raw.view(np.uint64), np.ascontiguousarray(raw).view(np.uint64)
        for c in range(0, len(one), _CHUNK):  # compare full digests as 4 words, a chunk at a time
            q = one[c:c + _CHUNK]
            same = (mine[lo[q]] == theirs[q]).all(axis=1)
            out[q[same]] = self._row(lo[q[same]])
        for q in np.flatnonzero(run > 1):  # equal search keys (duplicates, or a rare 64-bit collision)
            match = np.flatnonzero((self.raw[lo[q]:hi[q]] == raw[q]).all(axis=1))
            if len(match):
                out[q] = self._row(lo[q] + match).min()
        return out


@dataclass
class GroupIndex:
    """One feature group of one segment: sorted keys, attributes."""

    keys: KeyTable
    attrs: dict
    extras: tuple[str, ...]   # the EXTRAS datasets the group holds (layers, heads, heads_rest)
    n: int


@dataclass
class SegmentIndex:
    """Everything a segment holds, as arrays: its images table and each feature group's keys."""

    name: str
    images: KeyTable
    label: np.ndarray        # int8 per file row
    gen: np.ndarray          # int32 code per file row, into vocab
    vocab: list[str]
    groups: dict[tuple[str, str], GroupIndex] = field(default_factory=dict)
    n_errors: int = 0
    size: int = 0
    version: int = 2
    conflicts: list = field(default_factory=list)   # recorded (sha256, label, generator, path) rows
    damage: list = field(default_factory=list)      # stored search indexes found damaged (rebuilt in memory)


class ShaSet(Set):
    """A set of SHA-256 hex digests backed by sorted key tables (supports `in`, len, iteration), plus a
    small Python overlay for digests added later (`add`, `update`: e.g. what a server just cached).

    Several tables (one per segment) are searched in turn, never concatenated: building the set costs
    nothing however big the cache is."""

    def __init__(self, k64: np.ndarray, raw: np.ndarray):
        self._tables = [_sorted_table(k64, raw)] if len(k64) else []
        self._extra: set[str] = set()
        self._len: int | None = None

    @classmethod
    def of_tables(cls, tables: list[KeyTable]) -> ShaSet:
        """The union of already sorted tables (e.g. each segment's index), without copying them."""
        out = cls(np.zeros(0, np.uint64), np.zeros((0, 32), np.uint8))
        out._tables = [t for t in tables if len(t)]
        return out

    def add(self, sha: str) -> None:
        """Add one digest."""
        if sha not in self:
            self._extra.add(sha)
            if self._len is not None:
                self._len += 1

    def update(self, shas: Iterable[str]) -> None:
        """Add digests."""
        for s in shas:
            self.add(s)

    def __contains__(self, sha) -> bool:
        if sha in self._extra:
            return True
        if not isinstance(sha, (str, bytes)) or len(sha) != 64:
            return False
        try:
            k64, raw = keys_of([sha])
        except CacheError:
            return False
        return any(t.find(k64, raw)[0] >= 0 for t in self._tables)

    def contains_many(self, shas: Iterable[str]) -> np.ndarray:
        """Membership of each digest, vectorised."""
        shas = list(shas)
        k64, raw = keys_of(shas)
        o = np.argsort(k64, kind="stable")  # sort the needles once for every table
        k64, raw = k64[o], raw[o]
        found = np.zeros(len(shas), bool)
        out = found
        for t in self._tables:
            todo = np.flatnonzero(~out)
            if not len(todo):
                break
            out[todo] = t.find(k64[todo], raw[todo]) >= 0
        out = np.empty_like(found)
        out[o] = found
        if self._extra:
            out |= np.array([s in self._extra for s in shas], bool)
        return out

    def _distinct_raw(self) -> np.ndarray:
        if len(self._tables) == 1 and np.all(self._tables[0].k64[1:] > self._tables[0].k64[:-1]):
            return self._tables[0].raw
        if not self._tables:
            return np.zeros((0, 32), np.uint8)
        k64 = np.concatenate([t.k64 for t in self._tables])
        raw = np.concatenate([t.raw for t in self._tables])
        perm, starts = group_ids(k64, raw, np.arange(len(k64)))
        return raw[perm[starts]]

    def __bool__(self) -> bool:
        return bool(self._extra) or any(len(t) for t in self._tables)

    def __len__(self) -> int:
        if self._len is None:
            self._len = len(self._distinct_raw()) + len(self._extra)
        return self._len

    def __iter__(self) -> Iterator[str]:
        yield from raw_to_hex(self._distinct_raw())
        yield from self._extra


def _sorted_table(k64: np.ndarray, raw: np.ndarray) -> KeyTable:
    """A KeyTable of distinct keys from arrays in any order (no copy if already sorted and distinct)."""
    if len(k64) < 2 or np.all(k64[1:] > k64[:-1]):
        return KeyTable(k64, raw, None)
    perm, starts = group_ids(k64, raw, np.arange(len(k64)))
    first = perm[starts]
    return KeyTable(k64[first], raw[first], None)


def group_ids(k64: np.ndarray, raw: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort observations by (key, order); returns (sort permutation, start of each key's run).

    Observations of one key must come in `order` order along the arrays (true for tables concatenated
    oldest first, each sorted stably by key): a stable sort by key then keeps that order, and runs on
    concatenated sorted tables make it nearly linear."""
    s = np.argsort(k64, kind="stable")
    if not len(s):
        return s, np.zeros(0, np.int64)
    k = k64[s]
    same = k[1:] == k[:-1]
    if same.any() and (raw[s[1:]][same] != raw[s[:-1]][same]).any():
        # two digests share their first 8 bytes (astronomically rare): sort by the full digest
        s = np.lexsort((order,) + tuple(raw[:, i] for i in range(31, -1, -1)) + (k64,))  # key first, then digest
        new = np.ones(len(s), bool)
        new[1:] = (raw[s[1:]] != raw[s[:-1]]).any(axis=1)
        return s, np.flatnonzero(new)
    new = np.ones(len(s), bool)
    new[1:] = ~same
    return s, np.flatnonzero(new)


def unique_first(k64: np.ndarray, raw: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence (smallest `order`) of each distinct key, in `order` order."""
    s, starts = group_ids(k64, raw, order)
    first = s[starts]
    return first[np.argsort(order[first], kind="stable")]


def without_keys(t: KeyTable, bad: KeyTable) -> KeyTable:
    """`t` without the keys in `bad` (a copy only when something is removed)."""
    drop = bad.find(t.k64, t.raw) >= 0
    if not drop.any():
        return t
    keep = ~drop
    return KeyTable(t.k64[keep], t.raw[keep], None if t.row is None else t.row[keep])


def sorted_keys(k64: np.ndarray, raw: np.ndarray):
    o = np.argsort(k64, kind="stable")
    return k64[o], raw[o], np.arange(len(o), dtype=np.int64)


def same_content_rows(table: KeyTable, k64: np.ndarray, raw: np.ndarray, first_rows: np.ndarray) -> list[int]:
    """Further rows (after the first) of the same content within one segment's images table."""
    out = []
    lo = np.searchsorted(table.k64, k64, side="left")
    hi = np.searchsorted(table.k64, k64, side="right")
    for a, b, r0, rw in zip(lo, hi, first_rows, raw):
        if b - a > 1:
            for j in range(a, b):
                r = int(table.row[j])
                if r != int(r0) and (table.raw[j] == rw).all():
                    out.append(r)
    return sorted(out)
