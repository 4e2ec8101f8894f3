"""`bridge` command line: serve, check, mappings, translate, dlq, discards, destinations."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson

from bridge.config.loader import Reader, read_yaml
from bridge.config.model import Config, _store, build_config, existing_mappings_dir, load_config
from bridge.destinations.base import ConfigError
from bridge.records import MAX_LIST_LIMIT, dead_letter_json, discard_json, when
from bridge.store import open_store
from bridge.store.base import DestinationState, RecordFilter, Store
from bridge.suggest import did_you_mean

DEFAULT_CONFIG = os.environ.get("BRIDGE_CONFIG", "bridge.yaml")


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


# -- serve / check -------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from bridge.stop_signals import catch_early

    catch_early()  # first: a SIGTERM while the bridge starts must not be lost (bridge.stop_signals)
    from bridge.observability.logging import configure_logging, register_secret

    if args.sandbox:
        from bridge.sandbox import run_sandbox

        return run_sandbox(args.config)
    cfg = load_config(args.config)
    configure_logging(cfg.server.log_level, cfg.server.log_format)
    for secret in cfg.secrets():
        register_secret(secret)
    _warn_unset(cfg)
    from bridge.app import serve

    _run(serve(cfg))
    return 0


def _run(coro: Awaitable[None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def _warn_unset(cfg: Config) -> None:
    if cfg.unset_env:
        sys.stderr.write(f"warning: unset environment variables: {', '.join(sorted(cfg.unset_env))}\n")


def cmd_check(args: argparse.Namespace) -> int:
    from bridge.runtime import check_mappings

    cfg = load_config(args.config)
    from bridge.mapping import load_mapping_dir

    mappings = load_mapping_dir(existing_mappings_dir(cfg))
    problems = check_mappings(cfg, mappings)
    if problems:
        for p in problems:
            sys.stderr.write(f"{args.config}: {p}\n")
        return 1
    _warn_unset(cfg)
    sys.stdout.write(
        f"{args.config}: ok ({len(cfg.sources)} sources, {len(cfg.destinations)} destinations, "
        f"{len(mappings)} mappings)\n"
    )
    return 0


# -- operator commands on the store ----------------------------------------------------
def _store_from(config_path: str) -> Store:
    """Only the store section is needed: operators can run these without the secrets."""
    data, _ = read_yaml(config_path)
    store_cfg = _store(Reader(data.get("store") or {}, "store"))
    try:
        # Never upgrade a file from here: a server of the older version may be running on it.
        # Never create one either: a relative SQLite path read from another directory than
        # the server's would otherwise become a new, empty store, and a pause or a replay
        # would "succeed" on it.
        return open_store(store_cfg.url, upgrade=False, create=False)
    except ValueError as exc:
        raise ConfigError(f"store.url: {exc}") from None


def _configured_destinations(config_path: str) -> list[str]:
    """Destination names as the config file spells them, read without building the config
    (so without its secrets), in file order."""
    data, _ = read_yaml(config_path)
    entries = data.get("destinations")
    if not isinstance(entries, list):
        return []
    return [str(d["name"]) for d in entries if isinstance(d, dict) and d.get("name")]


def _with_store(args: argparse.Namespace, fn: Callable[[Store], Awaitable[int]]) -> int:
    async def go() -> int:
        store = _store_from(args.config)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(go())


def _time_arg(value: str) -> float | None:
    """``--since``/``--until``, read as the admin API reads them. Checked while argparse
    parses, so a bad value is a usage error (exit 2) before the store is opened."""
    from bridge.admin.routes import _time
    from bridge.httpx import ApiError

    try:
        return _time(value, f"{value!r:.60}")
    except ApiError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _limit_arg(value: str) -> int:
    """``--limit``, within the admin API's bounds: SQLite reads a negative LIMIT as none at
    all and PostgreSQL refuses it, so neither reaches the store."""
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r:.60} is not a whole number") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
    return limit


class _NotDeliverable(Exception):
    pass


def _deliverable(flt: RecordFilter, config_path: str, all_destinations: bool) -> RecordFilter:
    """A replay keeps to the destinations the config lists: what it queued for another
    would wait for good. A config of the store alone lists none, so it cannot say which a
    server delivers: the operator names one (--destination) or owns the choice of all of
    them (--all-destinations)."""
    names = _configured_destinations(config_path)
    if names and all_destinations:
        raise _NotDeliverable(
            f"--all-destinations is for a config that lists no destinations; {config_path} lists "
            f"{', '.join(names)}, and a replay keeps to them"
        )
    if not names:
        if flt.destination is None and not all_destinations:
            raise _NotDeliverable(
                f"{config_path} lists no destinations, so which ones a server delivers is unknown: name one "
                "with --destination NAME, or give --all-destinations to replay into every destination the "
                "records name (what is queued for one no server delivers waits for good)"
            )
        return flt
    if flt.destination is not None and flt.destination not in names:
        raise _NotDeliverable(
            f"no destination {flt.destination!r} is configured, so nothing would deliver what a replay"
            f" queues for it{did_you_mean(flt.destination, names)}"
        )
    return dataclasses.replace(flt, destinations=tuple(names))


async def _replay(
    replay: Callable[[RecordFilter], Awaitable[int]],
    flt: RecordFilter,
    args: argparse.Namespace,
    command: str,
    noun: str,
) -> int:
    try:
        flt = _deliverable(flt, args.config, args.all_destinations)
    except _NotDeliverable as exc:
        sys.stderr.write(f"{command}: {exc}\n")
        return 2
    n = await replay(flt)
    sys.stdout.write(f"replayed {n} {noun}(s); they will be re-mapped with the current mapping\n")
    return 0


def _names_records(flt: RecordFilter) -> bool:
    """Whether a replay or purge is limited: without a filter, only --all may touch every record.
    A bound at the epoch (``--until 0``) is a filter too, as the admin API takes it."""
    return any(v is not None for v in (flt.destination, flt.reason, flt.since, flt.until, flt.ids))


def _unfiltered(flt: RecordFilter, args: argparse.Namespace, command: str) -> bool:
    """Refuse (say why, return True) a replay or purge that names no records without --all."""
    if _names_records(flt) or args.all:
        return False
    sys.stderr.write(f"{command}: give a filter (--destination, --reason, --since, --until, ids) or --all\n")
    return True


def _filter(args: argparse.Namespace) -> RecordFilter:
    ids = tuple(args.ids) if getattr(args, "ids", None) else None
    return RecordFilter(
        destination=args.destination,
        reason=args.reason,
        since=args.since,
        until=args.until,
        ids=ids,
    )


R = TypeVar("R")


def _first(records: list[R], limit: int) -> tuple[list[R], bool]:
    """The first ``limit`` of ``records`` (listed with one more), and whether more matched."""
    return records[:limit], len(records) > limit


def _listed(shown: int, more: bool, noun: str) -> str:
    """The count line under a listing: one cut at --limit must not read as the total."""
    if more:
        return f"{shown} {noun} shown, the newest; more match (raise --limit, up to {MAX_LIST_LIMIT})\n"
    return f"{shown} {noun}\n"


def cmd_dlq(args: argparse.Namespace) -> int:
    async def go(store: Store) -> int:
        flt = _filter(args)
        if args.action == "list":
            records, more = _first(await store.list_dead(flt, args.limit + 1), args.limit)
            if args.json:
                _print_json([dead_letter_json(r, full=False) for r in records])
            else:
                sys.stdout.write(
                    f"{'ID':>6}  {'FAILED AT':20}  {'DESTINATION':16}  {'EVENT':28}  {'REASON':22}  ATTEMPTS\n"
                )
                for r in records:
                    sys.stdout.write(
                        f"{r.id:>6}  {when(r.failed_at) or '':20}  {r.destination[:16]:16}  {r.label[:28]:28}  "
                        f"{r.reason[:22]:22}  {r.attempts}\n"
                    )
                sys.stdout.write(_listed(len(records), more, "dead letter(s)"))
            return 0
        if args.action == "show":
            if not args.ids:
                sys.stderr.write("dlq show: give one or more ids\n")
                return 2
            found = {r.id: r for r in await store.list_dead(flt, len(args.ids))}
            asked = list(dict.fromkeys(args.ids))  # in the order asked, each once: the store lists the newest first
            if found:
                _print_json([dead_letter_json(found[i], full=True) for i in asked if i in found])
            missing = [str(i) for i in asked if i not in found]
            if missing:
                # Named, so a listing of fewer records than were asked for is not taken as all of them.
                sys.stderr.write(f"dlq show: no such dead letter: {', '.join(missing)}\n")
                return 1
            return 0
        if _unfiltered(flt, args, f"dlq {args.action}"):
            return 2
        if args.action == "replay":
            return await _replay(store.replay_dead, flt, args, "dlq replay", "dead letter")
        else:
            n = await store.purge_dead(flt)
            sys.stdout.write(f"purged {n} dead letter(s)\n")
        return 0

    return _with_store(args, go)


def cmd_discards(args: argparse.Namespace) -> int:
    async def go(store: Store) -> int:
        if args.action == "replay":
            flt = _filter(args)
            if _unfiltered(flt, args, "discards replay"):
                return 2
            return await _replay(store.replay_discards, flt, args, "discards replay", "discard")
        records, more = _first(await store.list_discards(_filter(args), args.limit + 1), args.limit)
        if args.json:
            _print_json([discard_json(r) for r in records])
            return 0
        sys.stdout.write(f"{'ID':>6}  {'DISCARDED AT':20}  {'DESTINATION':16}  {'EVENT':28}  REASON\n")
        for r in records:
            sys.stdout.write(
                f"{r.id:>6}  {when(r.discarded_at) or '':20}  {r.destination[:16]:16}  {r.label[:28]:28}  {r.reason}\n"
            )
        sys.stdout.write(_listed(len(records), more, "discard(s)"))
        return 0

    return _with_store(args, go)


def cmd_destinations(args: argparse.Namespace) -> int:
    configured = _configured_destinations(args.config)

    async def go(store: Store) -> int:
        states = await store.get_destination_states()
        known = args.action != "list" and (args.name in configured or args.name in states)
        # Counting the queue reads every queued job's index entry: a pause, wanted most when
        # the queue is huge, skips it for a name the config or the stored states know.
        stats = {} if known else await store.queue_stats()
        # Configured destinations first, in file order, then any the store still holds
        # work for (e.g. one removed from the config with events queued, or every one when
        # the config names the store alone).
        names = configured + sorted((set(states) | set(stats)) - set(configured))
        if args.action == "list":
            for n in names:
                st, qs = states.get(n), stats.get(n)
                sys.stdout.write(
                    f"{n}: {'PAUSED (' + st.reason + ')' if st and st.paused else 'active'}, "
                    f"queued {qs.depth if qs else 0}, dead letters {qs.dead if qs else 0}\n"
                )
            return 0
        if not known and args.name not in names:  # a name `list` shows may be paused and resumed
            hint = did_you_mean(args.name, names)
            sys.stderr.write(
                f"bridge destinations {args.action}: unknown destination {args.name!r}{hint}; "
                f"configured: {', '.join(configured) or 'none'}"
                + (f"; in the store: {', '.join(names[len(configured) :])}" if names != configured else "")
                + "\n"
            )
            return 2
        paused = args.action == "pause"
        reason = f"{'paused' if paused else 'resumed'} from the CLI"
        await store.set_destination_state(DestinationState(args.name, paused, reason if paused else "", store.now()))
        if paused:
            sys.stdout.write(f"{args.name}: paused\n")
            return 0
        # As the admin API's resume: waiting retries are due now (a running server drops
        # its backoff when it sees the resume).
        made = await store.make_due(args.name)
        sys.stdout.write(f"{args.name}: resumed; {made} waiting job{'' if made == 1 else 's'} made due now\n")
        return 0

    return _with_store(args, go)


# -- parser ------------------------------------------------------------------------------
# Said in words, not as the value read at import: `bridge.yaml` alone hid $BRIDGE_CONFIG.
CONFIG_HELP = "config file (default: $BRIDGE_CONFIG, else bridge.yaml)"


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--destination")
    p.add_argument("--reason")
    p.add_argument("--since", type=_time_arg, help="epoch seconds or ISO-8601")
    p.add_argument("--until", type=_time_arg, help="epoch seconds or ISO-8601")
    p.add_argument("--limit", type=_limit_arg, default=100, help=f"at most this many (1-{MAX_LIST_LIMIT})")
    p.add_argument("--json", action="store_true", help="print JSON")


# A record id as listings show it: digits 0-9 alone, as the admin API takes an id (int()
# would also read "+5", " 5" and other scripts' digits).
_DIGITS = re.compile(r"[0-9]+")


def _id_arg(value: str) -> int:
    if not _DIGITS.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r:.40} is not a record id (the digits 0-9)")
    return int(value)


def _add_ids(p: argparse.ArgumentParser, noun: str) -> None:
    """The records to act on by id, as the admin API's ``ids`` (``_filter`` reads them)."""
    p.add_argument("ids", nargs="*", type=_id_arg, help=f"{noun} ids")


def _add_replay_scope(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--all-destinations",
        action="store_true",
        help="replay only: with a config that lists no destinations, replay into every destination "
        "the records name (otherwise --destination is required)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridge", description="Segment <-> MoEngage event bridge")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the bridge")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="run local stand-in MoEngage and Segment upstreams and send to them",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="validate the config and its mappings")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("dlq", help="dead-letter queue: list, show, replay, purge")
    p.add_argument("action", choices=["list", "show", "replay", "purge"])
    _add_ids(p, "dead-letter")
    p.add_argument("--all", action="store_true", help="replay/purge without a filter")
    _add_replay_scope(p)
    _add_filters(p)
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("discards", help="events discarded on purpose, with their reason: list, replay")
    p.add_argument("action", choices=["list", "replay"])
    _add_ids(p, "discard")
    p.add_argument("--all", action="store_true", help="replay without a filter")
    _add_replay_scope(p)
    _add_filters(p)
    p.set_defaults(func=cmd_discards)

    p = sub.add_parser("destinations", help="list, pause or resume destinations")
    p.add_argument("action", choices=["list", "pause", "resume"])
    p.add_argument("name", nargs="?")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.set_defaults(func=cmd_destinations)

    from bridge.mapping.cli import register

    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "ids", None), list) and all(_DIGITS.fullmatch(x) for x in extra):
        # Ids after an option (`dlq purge --reason http_400 12 13`): argparse gives the
        # optional positional its (empty) list at the first option and calls the rest
        # unrecognized. They are the record ids, as they are before the options.
        args.ids += [int(x) for x in extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "command", None) == "destinations" and args.action != "list" and not args.name:
        parser.error(f"destinations {args.action} needs a destination name")
    if getattr(args, "command", None) == "destinations" and args.action == "list" and args.name:
        # Ignored, it answered for every destination as if for the one named.
        parser.error(f"destinations list takes no name (it lists every destination), got {args.name!r:.60}")
    if getattr(args, "all_destinations", False) and args.action != "replay":
        parser.error(f"--all-destinations applies to replay only, not {args.command} {args.action}")
    from bridge.mapping.api import MappingError
    from bridge.observability.redaction import redact_text
    from bridge.store.base import StoreError

    # These lines are written before logging (and its redaction) is set up: redact here,
    # so a password in a store URL or an echoed credential never reaches the terminal.
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        sys.stderr.write(f"config error: {redact_text(str(exc))}\n")
        return 2
    except StoreError as exc:
        sys.stderr.write(f"store error: {redact_text(str(exc))}\n")
        return 1
    except MappingError as exc:
        sys.stderr.write(f"mapping error:\n{exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    return code


# The shell's status for a process a SIGPIPE ended (128 + 13), as `yes | head` reports it.
EXIT_READER_GONE = 141


def _reader_gone() -> int:
    """The reader of stdout left (``bridge dlq list | head``): nothing more to say, and no
    traceback for it. stdout goes to /dev/null first, or the interpreter's last flush of
    what is still buffered fails again on the way out."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_READER_GONE


__all__ = ["build_config", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
