"""The running bridge: config, store, mappings, ingest and delivery, with their lifecycle.

Start order: store -> mappings -> delivery -> HTTP. Stop order is the reverse, so nothing
is accepted that cannot be stored and nothing leased is left unsettled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from bridge.config.model import Config, existing_mappings_dir
from bridge.delivery.manager import DeliveryManager
from bridge.delivery.metrics import DeliveryMetrics
from bridge.destinations.base import ConfigError
from bridge.mapping import load_mapping_dir
from bridge.mapping.api import CompiledMapping, MappingError
from bridge.mapping.reload import MappingSet, SettledChange, directory_fingerprint
from bridge.observability.failure_runs import FailureRun
from bridge.observability.redaction import register_secret
from bridge.sources.base import IngestMetrics, Ingestor
from bridge.store import open_store
from bridge.store.base import Store, StoreInUse
from bridge.suggest import did_you_mean

log = structlog.get_logger("bridge")

# Seconds between two prunes of the store (dedupe keys, delivered records, discards).
PRUNE_INTERVAL = 600.0

# The source format each source kind produces, which its destinations' mappings must read.
SOURCE_FORMATS = {"segment": "segment", "moengage_streams": "moengage_streams"}


def check_mappings(config: Config, mappings: Mapping[str, CompiledMapping]) -> list[str]:
    """Problems binding the config to the loaded mappings (empty when all is well)."""
    problems: list[str] = []
    formats: dict[str, set[str]] = {}
    for s in config.sources:
        for dest in s.to:
            formats.setdefault(dest, set()).add(SOURCE_FORMATS[s.kind])
    for i, d in enumerate(config.destinations):
        m = mappings.get(d.mapping)
        if m is None:
            known = ", ".join(sorted(mappings)) or "none"
            problems.append(
                f"destinations[{i}].mapping: no mapping named {d.mapping!r}{did_you_mean(d.mapping, mappings)} "
                f"(loaded: {known})"
            )
            continue
        if m.destination_kind != d.kind:
            problems.append(
                f"destinations[{i}].mapping: {d.mapping!r} produces {m.destination_kind} requests, "
                f"but destination {d.name!r} is {d.kind}"
            )
        problems += _unread_options(i, d.mapping, d.mapping_options, m.option_names())
        # A value of the wrong type would be compared by exact type and quietly not match.
        problems += [
            f"destinations[{i}].mapping_options.{key}: {problem}"
            for key, problem in m.option_problems(d.mapping_options)
        ]
        for fmt in sorted(formats.get(d.name, set()) - {m.source_format}):
            problems.append(
                f"destinations[{i}].mapping: {d.mapping!r} reads {m.source_format} events, "
                f"but a {fmt} source routes to {d.name!r}"
            )
    return problems


def _unread_options(i: int, mapping: str, options: Mapping[str, object], read: frozenset[str] | None) -> list[str]:
    """Unknown keys are errors: a misspelt mapping option would silently not apply."""
    if read is None:  # the mapping reads $options whole: any key may be used
        return []
    return [
        f"destinations[{i}].mapping_options.{key}: mapping {mapping!r} never reads $options.{key}"
        + (did_you_mean(key, read) or f" (it reads: {', '.join(sorted(read)) or 'no options'})")
        for key in sorted({str(k) for k in options} - read)
    ]


@dataclass(frozen=True, slots=True)
class MappingReload:
    """What a reload did: the problems that kept the old set in force, or else the names of
    the mappings it changed (empty when the files held nothing new: a no-op)."""

    problems: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


def changed_mappings(before: Mapping[str, CompiledMapping], after: Mapping[str, CompiledMapping]) -> list[str]:
    """Names of the mappings added, removed or changed (a new version), sorted."""
    versions = {n: m.version for n, m in before.items()}
    return sorted(n for n in versions.keys() | after.keys() if n not in after or versions.get(n) != after[n].version)


def store_for(config: Config) -> Store:
    """The configured store; a bad URL is a config error, not a crash."""
    opts: dict[str, object] = {"max_bytes": config.store.max_bytes}
    if config.store.url.startswith("sqlite:"):
        opts["min_free_disk_bytes"] = config.store.min_free_disk_bytes
    try:
        return open_store(config.store.url, **opts)
    except ValueError as exc:
        raise ConfigError(f"store.url: {exc}") from None


class Runtime:
    def __init__(
        self,
        config: Config,
        *,
        ingest_metrics: IngestMetrics | None = None,
        delivery_metrics: DeliveryMetrics | None = None,
        store: Store | None = None,
    ) -> None:
        self.config = config
        # Whoever runs the bridge (CLI, sandbox, tests), its secrets are unloggable and are
        # masked in anything kept from upstream answers (dead letters, retry errors).
        for secret in config.secrets():
            register_secret(secret)
        self.store = store or store_for(config)
        self._set = MappingSet()
        # One reload at a time, each applied in the order it started: two compiling at once
        # in threads could otherwise swap in the older files last.
        self._reload_lock = asyncio.Lock()
        self.mappings_error = "not loaded yet"
        self._loaded_fingerprint = ""
        self.delivery = DeliveryManager(config, self.store, self.mappings, delivery_metrics)
        self.ingestor = Ingestor(self.store, config, self.mappings, self.delivery.notify, ingest_metrics)
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_deadline: float | None = None  # monotonic; set when shutdown begins
        self.started_at = time.monotonic()  # for uptime: immune to clock steps and to the store's clock
        self.on_reload: Callable[[bool], None] = lambda ok: None

    def mappings(self) -> Mapping[str, CompiledMapping]:
        return self._set.mappings

    @property
    def mappings_dir(self) -> Path:
        return Path(self.config.mappings.dir)

    def load_mappings(self) -> None:
        """Initial load: any problem is fatal (raise ConfigError)."""
        try:
            loaded = load_mapping_dir(existing_mappings_dir(self.config))
        except MappingError as exc:
            raise ConfigError(f"mappings in {self.mappings_dir} are invalid:\n{exc}") from None
        problems = check_mappings(self.config, loaded)
        if problems:
            raise ConfigError("\n".join(problems))
        self._set = MappingSet.of(loaded)
        self.mappings_error = ""
        # The watcher starts from the files as loaded, not as they are when it starts: the
        # store opens in between (minutes, on PostgreSQL behind another node's schema lock).
        self._loaded_fingerprint = self._watched_fingerprint() if self.config.mappings.watch else ""

    async def reload_mappings(self) -> MappingReload:
        """Re-read, validate and swap atomically; on any problem keep the old set in force.

        The files are read and compiled in a thread: a large mapping file (up to 1 MiB) takes
        seconds to compile, and on the event loop every request and delivery waited for it."""
        async with self._reload_lock:
            return self._apply_reload(await asyncio.to_thread(self._compile_reload))

    def _compile_reload(self) -> tuple[MappingSet, list[str]]:
        """The new set and no problems, or this one and what is wrong (in a worker thread)."""
        try:
            new, diagnostics = self._set.reload(self.mappings_dir)
            return new, [str(d) for d in diagnostics] or check_mappings(self.config, new.mappings)
        except Exception as exc:  # keep the old set; the caller (admin API, SIGHUP, watcher) gets the problem
            log.exception("mapping_reload_error")
            return self._set, [f"{self.mappings_dir}: unexpected error while reloading: {type(exc).__name__}: {exc}"]

    def _apply_reload(self, compiled: tuple[MappingSet, list[str]]) -> MappingReload:
        new, problems = compiled
        if problems:
            for p in problems:
                log.error("mapping_reload_rejected", problem=p)
            self.on_reload(False)
            return MappingReload(problems=problems)
        changed = changed_mappings(self.mappings(), new.mappings)
        # One assignment: a delivery batch reads the snapshot once, so no event is half-mapped.
        self._set = new
        log.info("mappings_reloaded", changed=changed, versions={n: m.version for n, m in new.mappings.items()})
        self.on_reload(True)
        return MappingReload(changed=changed)

    async def start(self) -> None:
        try:
            await self.store.open()
        except StoreInUse as exc:
            # Like a port in use: the operator's to fix before serving, a one-line config error.
            raise ConfigError(f"store.url: {exc}") from exc
        try:
            if not self.mappings():
                self.load_mappings()
            await self.delivery.start()
        except BaseException:
            # A SIGTERM during start-up cancels it, and nothing stops a runtime that never
            # finished starting: close the store (and what delivery started) here.
            await self.stop()
            raise
        self._tasks.append(asyncio.create_task(self._prune_loop(), name="prune"))
        # In the background: counting a long queue takes a while, and serving need not wait.
        self._tasks.append(asyncio.create_task(self._warn_of_unconfigured_work(), name="unconfigured-work"))
        if self.config.mappings.watch:
            self._tasks.append(asyncio.create_task(self._watch_mappings(), name="watch-mappings"))

    @property
    def stopping(self) -> bool:
        return self._stop_deadline is not None

    def begin_stop(self) -> None:
        """Shutdown has begun: deliveries start nothing new and the clock for in-flight
        work starts now, so HTTP draining and delivery draining share one timeout."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.config.server.shutdown_timeout
        self.delivery.begin_stop()

    async def stop(self) -> None:
        self.begin_stop()
        assert self._stop_deadline is not None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # At least a moment for in-flight sends to settle, even if HTTP draining used it all.
        await self.delivery.stop(max(self._stop_deadline - time.monotonic(), 0.5))
        await self.store.close()

    async def _warn_of_unconfigured_work(self) -> None:
        """Jobs or dead letters of a destination no longer configured (removed, renamed):
        no worker leases them, so they wait for good. Said once, loudly, at start."""
        try:
            stats = await self.store.queue_stats()
        except Exception:
            log.exception("queue_stats_failed")
            return
        configured = {d.name for d in self.config.destinations}
        for name, s in sorted(stats.items()):
            if name not in configured and (s.depth or s.dead):
                log.warning(
                    "unconfigured_destination_has_work",
                    destination=name,
                    queued=s.depth,
                    dead_letters=s.dead,
                    hint="no worker delivers them: configure the destination again under this name; its dead"
                    " letters can also be purged (bridge dlq purge --destination NAME)",
                )

    async def _prune_loop(self) -> None:
        cfg = self.config.store
        # Through a store outage: the first failure with its traceback, then a line without.
        failures = FailureRun("store_prune_failed", "store_prune_recovered")
        while True:
            try:
                now = self.store.now()
                removed = await self.store.prune(now - cfg.dedupe_hours * 3600, now - cfg.retention_hours * 3600)
            except Exception as exc:
                failures.failed(exc)
            else:
                failures.succeeded()
                if removed:
                    log.info("store_pruned", rows=removed)
            await asyncio.sleep(PRUNE_INTERVAL)

    def _watched_fingerprint(self) -> str:
        lookups = [f for m in self.mappings().values() for f in getattr(m, "files", ())]
        return directory_fingerprint(self.mappings_dir, lookups)

    async def _watch_mappings(self) -> None:
        change = SettledChange(self._loaded_fingerprint or self._watched_fingerprint())
        while True:
            await asyncio.sleep(self.config.mappings.watch_interval)
            try:
                current = self._watched_fingerprint()
            except OSError:
                continue
            except Exception:
                log.exception("mapping_watch_failed")
                continue
            if change.due(current):
                try:
                    if not (await self.reload_mappings()).problems:
                        # From the fingerprint this reload was due to, not one taken after it:
                        # a save landing while it compiled was counted as loaded, and never
                        # was. A new set that reads other lookup files changes the fingerprint
                        # too: that costs one more reload, which finds nothing new.
                        change = SettledChange(current)
                except Exception:  # the watcher must outlive any one bad reload
                    log.exception("mapping_watch_failed")
