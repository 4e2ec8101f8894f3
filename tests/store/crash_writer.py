"""Run as a subprocess by the crash test: enqueue forever, print each acknowledged id.

Usage: python -m tests.store.crash_writer STORE_URL [POSTGRES_SCHEMA | SQLITE_DEDUPE_MERGE_AT]
"""

from __future__ import annotations

import asyncio
import os
import sys

from bridge.store import open_store
from tests.store.helpers import event


async def main(url: str, extra: str | None) -> None:
    opts: dict[str, object]
    if url.startswith("sqlite"):
        opts = {"min_free_disk_bytes": 0}
        if extra:
            opts["dedupe_merge_at"] = int(extra)  # small: merges run while we are killed
    else:
        opts = {"schema": extra}
    store = open_store(url, **opts)
    await store.open()
    counter = 0

    async def writer(worker: int) -> None:
        nonlocal counter
        while True:
            counter += 1
            ids = [f"p{os.getpid()}-w{worker}-{counter}-{k}" for k in range(5)]
            await store.enqueue("web", [event(i, f"user{worker}") for i in ids])
            # Printed only after enqueue returned: these ids were acknowledged.
            sys.stdout.write("\n".join(ids) + "\n")
            sys.stdout.flush()

    await asyncio.gather(*(writer(w) for w in range(8)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
