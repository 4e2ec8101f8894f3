"""Which of a job's outputs were delivered already, so that no later attempt sends them again.

A mapping may give one event several outputs (``continue: true``), and they may go out in
different requests: a MoEngage Track User and a Create Event, say. When one is accepted
and another is not (retried, given back unsent, dead-lettered), the job stays queued, and
its next attempt must send only what is still missing: MoEngage's Create Event does not
dedupe, so a second send is a second event.

An output is known by a digest of what it is, not by its place in the mapping's list: the
mapping may change between two attempts (a fix deployed, a replay after it), and an output
it now makes differently must go out, while one it makes the same must not. The digest
covers the output's kind (its endpoint) and its body exactly as encoded and sent.

Eight bytes of BLAKE2b: digests are only ever compared among one job's few outputs, so a
collision (about one in 2^64 per pair) is far below any other way a send can be lost.

The digests of a job are kept end to end in one bytes value (Job.delivered_outputs, and
the store's ``delivered_outputs`` column): a multiset, so a mapping that makes the same
output twice for one event has it sent twice, once per copy, never more.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from hashlib import blake2b

from bridge.destinations.base import Item
from bridge.store.base import OUTPUT_DIGEST_BYTES

DIGEST_BYTES = OUTPUT_DIGEST_BYTES  # the store keeps them end to end and counts them by it


def output_digest(item: Item) -> bytes:
    hashed = blake2b(item.output.kind.encode(), digest_size=DIGEST_BYTES)
    hashed.update(b"\x00")  # a kind is a name: it never holds NUL, so kind and body never run together
    hashed.update(item.encoded)
    return hashed.digest()


def digests_of(items: Iterable[Item]) -> bytes:
    """The digests of ``items``, end to end (as the store keeps them)."""
    return b"".join(output_digest(item) for item in items)


def split_digests(delivered: bytes) -> list[bytes]:
    return [delivered[i : i + DIGEST_BYTES] for i in range(0, len(delivered), DIGEST_BYTES)]


def not_yet_delivered(items: list[Item], delivered: bytes) -> list[Item]:
    """``items`` less one for each digest in ``delivered`` that matches one, in order."""
    left = Counter(split_digests(delivered))
    kept: list[Item] = []
    for item in items:
        digest = output_digest(item)
        if left[digest] > 0:
            left[digest] -= 1
        else:
            kept.append(item)
    return kept
