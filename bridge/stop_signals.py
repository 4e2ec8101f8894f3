"""SIGTERM and SIGINT for `bridge serve`, from its first moment to its last.

Until a handler is installed a SIGTERM takes its default action, and the bridge runs as
PID 1 in its image: for a namespace's init the kernel drops a signal it has no handler
for. A SIGTERM during start-up (config, stand-ins, the store opening: minutes on PostgreSQL
behind another node's schema lock) was then lost, and the bridge went on to serve until a
second one. Outside a container it killed the process instead, with no drain, leaving
whatever delivery had leased to wait out its lease. So ``catch_early`` remembers the
signal from the start, and ``stop_event`` hands it, and every later one, to the loop.

Only the standard library here: this is installed before the rest of the bridge loads.
"""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received = False


def _remember(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = True


def catch_early() -> None:
    """Remember a stop signal until the event loop takes them over (``stop_event``)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)


def stop_event(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event SIGTERM and SIGINT set from now on, already set if one came before."""
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    # After the handlers: a signal from here on reaches the loop, one before was remembered.
    if _received:
        stop.set()
    return stop
