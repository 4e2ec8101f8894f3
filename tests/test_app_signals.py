"""SIGHUP reloads the mappings: once for a burst of signals, and never after shutdown began."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from bridge.app import _reload_on_hangup
from bridge.runtime import MappingReload, Runtime


class Counting:
    def __init__(self) -> None:
        self.reloads = 0
        self.stopping = False

    async def reload_mappings(self) -> MappingReload:
        self.reloads += 1
        return MappingReload()


async def test_a_burst_of_hangups_is_one_reload_and_none_after_shutdown_began() -> None:
    runtime = Counting()
    on_hangup = _reload_on_hangup(cast(Runtime, cast(Any, runtime)), asyncio.get_running_loop())
    for _ in range(100):
        on_hangup()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert runtime.reloads == 1
    on_hangup()
    await asyncio.sleep(0)
    assert runtime.reloads == 2  # a later signal is a later reload
    runtime.stopping = True
    on_hangup()
    await asyncio.sleep(0)
    assert runtime.reloads == 2


class Slow(Counting):
    """A reload that stays in its compile until ``done`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.done = asyncio.Event()

    async def reload_mappings(self) -> MappingReload:
        self.reloads += 1
        await self.done.wait()
        return MappingReload()


async def test_a_hangup_during_a_reload_asks_for_one_more_after_it() -> None:
    """The files may have changed again since the running reload read them: signals that
    arrive meanwhile are one more reload, not none and not one each."""
    runtime = Slow()
    on_hangup = _reload_on_hangup(cast(Runtime, cast(Any, runtime)), asyncio.get_running_loop())
    on_hangup()
    await asyncio.sleep(0)
    assert runtime.reloads == 1  # compiling
    for _ in range(10):
        on_hangup()
    runtime.done.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert runtime.reloads == 2
