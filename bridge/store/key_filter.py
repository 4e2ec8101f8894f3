"""A Bloom filter with one probe over dedupe keys, in front of the SQLite lookup.

Nearly every message id a client sends is new, so nearly every dedupe lookup is a miss,
and a miss in the ``dedupe_keys`` B-tree costs a seek into it: 1.5 us a key against 300k
stored keys, 3.3 against 3M, more once the table outgrows the page cache
(docs/benchmarks.md, session 13). A filter answers "surely not stored" from memory for
most of them; only its positives (the stored keys and a few false ones) go to SQLite.
It may say "maybe" for a key that is not there; it never says "no" for one that is.

Keys are BLAKE2b digests (``sqlite_dedupe.dedupe_keys_of``), uniformly random already, so
a key's first four bytes are its probe: no hashing. One probe, not the two or three a
Bloom filter usually takes: in Python each probe costs as much as the bit it saves, and
with 2^27 bits one probe keeps false positives near 0.75% at 1M keys and 7% at 10M.
Past that the filter lets more keys through to SQLite but stays correct. Its 16 MiB are a
fixed cost, taken when the first keys arrive.

The per-key work runs in C (``map`` over bound methods, ``memoryview.cast``): 0.36-0.44 us
a key to add or to check, where a Python loop checking the same keys took 0.75. Adding
keys reads and sets each byte in turn, lazily, so two keys of one call that share a byte
both keep their bit.

The bits live in an anonymous memory map, not a bytearray: ``bytearray(16 MiB)`` writes
every byte before it returns (9 ms here, more on a busy core), holding the GIL, so the
event loop stalled each time a store began its filter. The kernel hands out a map's
zeroed pages as they are first touched, and indexing a memoryview of it is also a little
faster than indexing a bytearray (0.33 against 0.38 us a key, measured).
"""

from __future__ import annotations

import mmap
import operator
import sys
from collections.abc import Sequence
from itertools import compress, repeat
from typing import Final

KEY_BYTES = 16
# The probe is a native 32-bit word: its low 3 bits pick the bit, its top bits the byte.
WORD: Final = "I"
if memoryview(bytes(4)).cast(WORD).itemsize != 4:  # pragma: no cover - every platform we run on
    raise ImportError("bridge needs a 4-byte unsigned int for its dedupe filter")
DEFAULT_BITS_LOG2 = 27  # 16 MiB
# A key's bit within its byte, by the probe's low byte: a translation table, so that
# ``bytes.translate`` gives every key's bit in one call.
_BIT = bytes(1 << (b & 7) for b in range(256))
_WORDS_PER_KEY = KEY_BYTES // 4
# Where in a key the probe's low byte is: its first byte where native words are little-endian.
_LOW_BYTE = 0 if sys.byteorder == "little" else 3


def check_bits(bits_log2: int) -> None:
    if not 3 < bits_log2 <= 32:
        raise ValueError(f"a key filter has 2^4 to 2^32 bits, got 2^{bits_log2}")


class KeyFilter:
    def __init__(self, bits_log2: int = DEFAULT_BITS_LOG2) -> None:
        check_bits(bits_log2)
        self._bytes = memoryview(mmap.mmap(-1, 1 << (bits_log2 - 3)))
        self._shift = 32 - (bits_log2 - 3)  # the word's top bits index the bytes
        self.count = 0  # keys added, repeats included (a rebuild starts it again)

    def _probes(self, keys: Sequence[bytes]) -> tuple[list[int], bytes]:
        """Each key's byte offset, and its bit within that byte."""
        joined = b"".join(keys)
        if len(joined) != KEY_BYTES * len(keys):
            raise ValueError(f"dedupe keys are {KEY_BYTES} bytes each")
        words = memoryview(joined).cast(WORD)[::_WORDS_PER_KEY].tolist()
        offsets = list(map(operator.rshift, words, repeat(self._shift)))
        # Each probe's low byte, sliced out of the keys, through _BIT: two calls for all
        # the keys, where two map steps a key took a quarter of the filter's work.
        bits = joined[_LOW_BYTE::KEY_BYTES].translate(_BIT)
        return offsets, bits

    def add(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        offsets, bits = self._probes(keys)
        table = self._bytes
        # Lazy: each byte is read, or-ed and written back before the next key's is read.
        for _ in map(table.__setitem__, offsets, map(operator.or_, map(table.__getitem__, offsets), bits)):
            pass
        self.count += len(keys)

    def check_and_add(self, keys: Sequence[bytes]) -> list[bytes]:
        """``might_hold(keys)`` as the filter was before this call, then ``add(keys)``, in
        one pass over the keys' bytes: a lookup of new keys is followed by adding them,
        and two passes cost half as much again (0.75 against 0.50 us a key).

        It counts nothing: a lookup also sees keys that are duplicates, or looked up again
        when a failed group reruns alone, and ``count`` drives rebuilds after pruning, so
        the caller counts the keys it records (``count_added``)."""
        if not keys:
            return []
        offsets, bits = self._probes(keys)
        table = self._bytes
        before = bytes(map(table.__getitem__, offsets))  # read all first: keys of this call never count
        for _ in map(table.__setitem__, offsets, map(operator.or_, map(table.__getitem__, offsets), bits)):
            pass
        return _held(keys, before, bits)

    def count_added(self, n: int) -> None:
        """Count ``n`` keys recorded after ``check_and_add`` put them in."""
        self.count += n

    def might_hold(self, keys: Sequence[bytes]) -> list[bytes]:
        """The keys that may have been added, in order; every key that was added is among them."""
        if not keys:
            return []
        offsets, bits = self._probes(keys)
        return _held(keys, bytes(map(self._bytes.__getitem__, offsets)), bits)


def _held(keys: Sequence[bytes], found: bytes, bits: bytes) -> list[bytes]:
    """The keys whose bit is set in their ``found`` byte. Nearly every key a client sends is
    new, so first all of them at once, ANDed as two integers: a key at a time only when
    some bit is set."""
    if not int.from_bytes(found, "little") & int.from_bytes(bits, "little"):
        return []
    return list(compress(keys, map(operator.and_, found, bits)))
