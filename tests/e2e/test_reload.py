"""Mapping reload around the edges of a running bridge: signals during shutdown, and the
file watcher racing an edit."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bridge.mapping.loader import load_mapping_file
from bridge.runtime import MappingReload, Runtime
from bridge.store.base import DestinationState
from bridge.testing.standins import MoEngageStandIn
from bridge.testing.upstream import Planned
from tests.e2e.harness import ADMIN_TOKEN, API_KEY, WORKSPACE, WRITE_KEY, Bridge, basic, config_dict, wait_until
from tests.e2e.proc import BridgeProcess
from tests.e2e.test_operations import copy_mappings

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def on_copied_mappings(make_bridge: Callable[..., Any], tmp_path: Path) -> tuple[Bridge, Runtime, Path]:
    """A bridge mapping from a copy of the shipped mappings, which the test may edit: the
    bridge, its runtime and the copy's directory."""
    mappings = copy_mappings(tmp_path)

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)

    bridge: Bridge = await make_bridge(tweak)
    assert bridge.runtime is not None
    return bridge, bridge.runtime, mappings


async def test_a_sighup_during_shutdown_does_not_kill_the_process(tmp_path: Path) -> None:
    """A deploy tool may send SIGHUP (reload) while a bridge is draining. Shutdown waits for
    the requests in flight, and SIGHUP's default action ended the process there: their jobs
    were never acked, so the next start sent those events again."""
    moengage = MoEngageStandIn(WORKSPACE, API_KEY)
    server = TestServer(moengage.app(), host="127.0.0.1")
    await server.start_server()
    raw = config_dict(tmp_path, str(server.make_url("")).rstrip("/"), "http://127.0.0.1:9")
    raw["sources"] = raw["sources"][:1]
    raw["destinations"] = raw["destinations"][:1]
    raw["server"]["shutdown_timeout"] = 20
    proc = BridgeProcess(raw, tmp_path)
    try:
        await proc.start()
        assert proc.proc is not None
        moengage.hold()  # the delivery stays in flight: shutdown waits for it
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{proc.url}/v1/track", json={"userId": "user-d", "event": "Drained"}, headers=basic(WRITE_KEY)
            ) as r,
        ):
            assert r.status == 200
        await moengage.wait_for(lambda: moengage.received >= 1, timeout=10)
        proc.terminate()
        await wait_until(lambda: "shutting_down" in proc.log_path.read_text(), what="shutdown to begin")
        proc.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)  # for the signal to land before the upstream answers (not an assertion)
        moengage.release()
        assert await proc.wait() == 0, proc.log_tail()  # -1: killed by SIGHUP
        assert len(moengage.events()) == 1
        assert '"event":"stopped"' in proc.log_path.read_text()
    finally:
        moengage.release()
        await proc.ensure_stopped()
        moengage.stop()
        await server.close()


async def test_an_edit_landing_while_the_watcher_reloads_is_loaded_too(
    make_bridge: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second save that lands while the watcher's reload compiles the first: the watcher
    took the files' fingerprint after the reload, so counted the second save as loaded, and
    the bridge went on mapping with the first until the files changed again."""
    mappings = copy_mappings(tmp_path)

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"] = {"dir": str(mappings), "watch": True, "watch_interval": 0.1}

    bridge: Bridge = await make_bridge(tweak)
    runtime = bridge.runtime
    assert runtime is not None
    path = mappings / "segment-to-moengage.yaml"
    text = path.read_text()
    reload = runtime.reload_mappings
    saves = [text.replace("action: Viewed Screen", "action: Screen Seen Again")]

    async def reload_while_saved_again() -> MappingReload:
        result = await reload()
        if saves:
            path.write_text(saves.pop())  # the editor's second save, during the compile
        return result

    monkeypatch.setattr(runtime, "reload_mappings", reload_while_saved_again)
    path.write_text(text.replace("action: Viewed Screen", "action: Screen Seen"))
    await wait_until(lambda: not saves, what="the first save's reload")
    final = load_mapping_file(path).version
    await wait_until(
        lambda: runtime.mappings()["segment-to-moengage"].version == final, what="the second save's reload"
    )


async def test_the_guards_resume_after_a_mapping_change_keeps_the_upstreams_backoff(
    make_bridge: Callable[..., Any],
) -> None:
    """A node that reloaded the fix resumes the guard's pause for every node. The others
    see that resume in the store, and took it for an operator's "deliver now": they dropped
    the Retry-After the upstream had asked of them (README: the guard's own resume keeps it)."""
    bridge: Bridge = await make_bridge()
    runtime = bridge.runtime
    assert runtime is not None
    store = runtime.store
    bridge.moengage.plan(Planned(429, headers={"Retry-After": "120"}))
    assert (await bridge.post("/v1/track", {"userId": "user-b", "event": "Held"}, basic(WRITE_KEY)))[0] == 200

    async def status() -> dict[str, Any]:
        _, body = await bridge.get("/admin/status", ADMIN)
        dest: dict[str, Any] = next(d for d in body["destinations"] if d["name"] == "moengage-main")
        return dest

    async def backing_off() -> bool:
        return float((await status())["backing_off_seconds"]) > 0

    await wait_until(backing_off, what="the Retry-After to hold the destination")
    version = runtime.mappings()["segment-to-moengage"].version
    # Another node's guard pauses the destination, and then, the fix reloaded there, resumes it.
    paused = DestinationState(
        "moengage-main", True, "events failed to map", store.now(), {"by": "guard", "version": version}
    )
    await store.set_destination_state(paused)

    async def is_paused(expected: bool) -> bool:
        return bool((await status())["paused"]) is expected

    await wait_until(lambda: is_paused(True), what="the pause to reach this node")
    await store.set_destination_state(
        DestinationState("moengage-main", False, "mapping changed", store.now(), {"by": "guard"})
    )
    await wait_until(lambda: is_paused(False), what="the resume to reach this node")
    assert (await status())["backing_off_seconds"] > 60  # still the upstream's 120 s


async def test_an_account_pause_outlasts_a_mapping_change(make_bridge: Callable[..., Any], tmp_path: Path) -> None:
    """A 401 says the credentials are wrong, not the mapping: the pause waits for an operator
    (docs/operations.md). Stored as the guard's, any reload that changed the mapping ended it,
    and the next request paused the destination again, until the next reload."""
    bridge, runtime, mappings = await on_copied_mappings(make_bridge, tmp_path)
    bridge.moengage.refuse_all(401)
    assert (await bridge.post("/v1/track", {"userId": "user-k", "event": "Held"}, basic(WRITE_KEY)))[0] == 200

    async def paused() -> bool:
        _, body = await bridge.get("/admin/status", ADMIN)
        return bool(next(d for d in body["destinations"] if d["name"] == "moengage-main")["paused"])

    await wait_until(paused, what="the 401 to pause moengage-main")
    path = mappings / "segment-to-moengage.yaml"
    path.write_text(path.read_text().replace("action: Viewed Web Page", "action: Page Seen"))
    status, body = await bridge.post("/admin/reload", None, ADMIN)
    assert status == 200 and body["changed"] == ["segment-to-moengage"], body
    worker = runtime.delivery.workers["moengage-main"]
    await worker._check_mapping_changed()  # what the loop asks on its next turn
    assert worker.paused and await paused()
    # An operator's resume, once the credentials are fixed, delivers.
    bridge.moengage.refuse_all(None)
    assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1, timeout=10)


async def test_a_reload_refuses_a_lookup_path_that_names_a_device_and_keeps_serving(
    make_bridge: Callable[..., Any], tmp_path: Path
) -> None:
    """A lookup `file:` that names a device or a FIFO (/dev/zero never ends) was read on the
    event loop: the reload hung the server. It is refused, with the message `bridge mappings
    check` prints, and the old set keeps mapping."""
    bridge, runtime, mappings = await on_copied_mappings(make_bridge, tmp_path)
    before = runtime.mappings()["segment-to-moengage"].version
    path = mappings / "segment-to-moengage.yaml"
    text = path.read_text().replace("{file: lookups/moengage-platforms.yaml}", "{file: /dev/null}")
    path.write_text(text)
    # Where the path is in the shipped file: its line and column (counted from 1).
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "/dev/null" in row)
    column = text.splitlines()[line - 1].index("/dev/null") + 1
    status, body = await bridge.post("/admin/reload", None, ADMIN)
    assert (status, body["code"]) == (400, "invalid_mappings"), body
    assert body["problems"] == [
        f"{path}:{line}:{column}: lookups.platforms.file: cannot read lookup file /dev/null: it is not a regular file"
    ]
    assert runtime.mappings()["segment-to-moengage"].version == before
    sent = await bridge.post("/v1/track", {"userId": "user-z", "event": "Kept"}, basic(WRITE_KEY))
    assert sent[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1, timeout=10)
    assert bridge.moengage.events()[0]["actions"][0]["action"] == "Kept"


async def test_the_server_answers_while_a_reload_compiles(make_bridge: Callable[..., Any], monkeypatch: Any) -> None:
    """A reload compiled on the event loop: a large mapping file (up to 1 MiB, seconds to
    compile) held every request and delivery until it was done. The compile runs in a
    thread; here it waits until a call sent meanwhile has been answered."""
    import threading

    from bridge.mapping.loader import compile_mapping_dir as real

    bridge: Bridge = await make_bridge()
    started, answered = threading.Event(), threading.Event()
    waited_out: list[bool] = []

    def slow_compile(directory: Path) -> Any:
        started.set()
        waited_out.append(not answered.wait(3))  # on the event loop, nothing could answer
        return real(directory)

    monkeypatch.setattr("bridge.mapping.reload.compile_mapping_dir", slow_compile)
    reloading = asyncio.create_task(bridge.post("/admin/reload", None, ADMIN))
    assert await asyncio.to_thread(started.wait, 10)
    call = {"userId": "during-reload", "event": "Reload Seen", "messageId": "during-reload-1"}
    try:
        assert (await bridge.post("/v1/track", call, basic(WRITE_KEY)))[0] == 200
    finally:
        answered.set()
    status, body = await reloading
    assert status == 200, body
    assert waited_out == [False], "the call was answered only once the compile was over"
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
