"""CLI commands for mappings: ``mappings check``, ``mappings test`` and ``translate``.

The integrator wires them with ``register(subparsers)``; each subparser sets
``func`` to its handler, which takes the parsed Namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import orjson

from bridge.mapping.api import CompiledMapping, Diagnostic, MapContext
from bridge.mapping.fixtures import run_fixtures
from bridge.mapping.loader import compile_mapping_dir, compile_mapping_file
from bridge.mapping.translate import InputError, parse_events, translate_events
from bridge.mapping.yamlnodes import did_you_mean
from bridge.sources.dry_run import Refused, as_ingested_each, refused_json

DEFAULT_DIR = "mappings"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mp = subparsers.add_parser("mappings", help="check and test mapping files")
    msub = mp.add_subparsers(dest="mappings_command", required=True)

    check = msub.add_parser("check", help="validate mapping files; exit 1 on any error")
    check.add_argument("paths", nargs="*", metavar="PATH", help="mapping files or directories")
    check.add_argument("--mappings-dir", default=None, help=f"directory to check (default: {DEFAULT_DIR})")
    _config_option(check)
    check.set_defaults(func=cmd_check)

    test = msub.add_parser("test", help="run the fixtures under <mappings dir>/tests; exit 1 on failure")
    test.add_argument("--mappings-dir", default=None, help=f"mappings directory (default: {DEFAULT_DIR})")
    _config_option(test)
    test.set_defaults(func=cmd_test)

    tr = subparsers.add_parser("translate", help="map events from stdin and print what would be sent")
    tr.add_argument("--mapping", required=True, help="mapping name (file stem), e.g. segment-to-moengage")
    tr.add_argument("--mappings-dir", default=None, help=f"mappings directory (default: {DEFAULT_DIR})")
    tr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a mapping option")
    tr.add_argument("--linked-id", default=None, help="identity link resolved for the event's identity key")
    tr.add_argument("--source", default="", help="source name seen by the mapping as $source")
    _config_option(tr)
    tr.set_defaults(func=cmd_translate)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="take the mappings directory from this config's mappings.dir (default: $BRIDGE_CONFIG's, when set)",
    )


def _dir(args: argparse.Namespace) -> Path:
    explicit = getattr(args, "mappings_dir", None)
    if explicit:
        return Path(explicit)
    # $BRIDGE_CONFIG is `bridge serve`'s default config, so the mappings checked by default
    # are the ones the server loads: in the image, /etc/bridge/mappings, not ./mappings.
    config = getattr(args, "config", None) or os.environ.get("BRIDGE_CONFIG")
    if config:
        return Path(_configured_dir(config))
    return Path(DEFAULT_DIR)


def _configured_dir(config_path: str) -> str:
    """mappings.dir of a config file; only that key is read, so no secrets are needed.
    Read as `bridge serve` and `bridge check` read it: a list there is the same config
    error, not a directory named "[...]"."""
    from bridge.config.loader import Reader, read_yaml

    data, _ = read_yaml(config_path)
    return Reader(data, "").sub("mappings").str("dir", DEFAULT_DIR)


def cmd_check(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    paths = [Path(p) for p in (getattr(args, "paths", None) or [])] or [_dir(args)]
    diagnostics: list[Diagnostic] = []
    loaded: list[tuple[str, str]] = []
    for p in paths:
        if p.is_dir():
            mappings, diags = compile_mapping_dir(p)
            diagnostics.extend(diags)
            loaded.extend((m.path, m.version) for m in mappings.values())
        elif p.exists():
            mapping, diags = compile_mapping_file(p)
            diagnostics.extend(diags)
            if mapping is not None:
                loaded.append((mapping.path, mapping.version))
        else:
            diagnostics.append(Diagnostic(str(p), 1, 1, "<root>", "no such file or directory"))
    for d in diagnostics:
        print(d, file=out)
    for path, version in loaded:
        print(f"ok {path} (version {version})", file=out)
    if diagnostics:
        print(f"{len(diagnostics)} error(s)", file=out)
        return 1
    if not loaded:
        print("no mapping files found", file=out)
        return 1
    return 0


def cmd_test(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    report = run_fixtures(_dir(args))
    print(report.render(), file=out)
    return 0 if report.ok else 1


def _option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InputError(f"--option {text!r}: expected KEY=VALUE")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw
    return key, value


def _check_options_read(options: dict[str, Any], read: frozenset[str] | None, mapping: str) -> None:
    """As `bridge check` refuses a destination's mapping_options key the mapping never
    reads: a misspelt --option would not apply, and the dry run would answer as if it did."""
    if read is None:  # the mapping reads $options whole: any key may be used
        return
    for key in sorted(set(options) - read):
        hint = did_you_mean(key, read) or f" (it reads: {', '.join(sorted(read)) or 'no options'})"
        raise InputError(f"--option {key}: mapping {mapping!r} never reads $options.{key}{hint}")


def _as_text_hint(mapping: CompiledMapping, key: str, value: Any) -> str:
    """A value is read as JSON when it parses, so `--option id=123` is a number: when its
    text is what the option takes, say how to give the text."""
    if isinstance(value, str):
        return ""
    text = orjson.dumps(value).decode()
    if mapping.option_problems({key: text}):
        return ""
    return f" (a value is read as JSON when it parses: for the text, quote it: {key}='\"{text}\"')"


def cmd_translate(
    args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    directory = _dir(args)
    mappings, diagnostics = compile_mapping_dir(directory)
    mapping = mappings.get(args.mapping)
    if mapping is None:
        for d in diagnostics:
            print(d, file=err)
        known = ", ".join(sorted(mappings)) or "none"
        hint = did_you_mean(args.mapping, mappings)
        print(f"error: no valid mapping {args.mapping!r}{hint} in {directory} (loaded: {known})", file=err)
        return 1
    try:
        options = dict(_option(o) for o in getattr(args, "option", None) or [])
        _check_options_read(options, mapping.option_names(), args.mapping)
        for key, problem in mapping.option_problems(options):
            raise InputError(f"--option {key}: {problem}{_as_text_hint(mapping, key, options[key])}")
        # bytes from the real stdin: input that is not UTF-8 is then invalid JSON, not a crash
        source: Any = stdin if stdin is not None else getattr(sys.stdin, "buffer", sys.stdin)
        # Python sets sys.stdin to None when the process starts with it closed (<&-).
        text = source.read() if source is not None else ""
        events = parse_events(text)
    except InputError as exc:
        print(f"error: {exc}", file=err)
        return 1
    ctx = MapContext(linked_id=getattr(args, "linked_id", None), options=options, source=getattr(args, "source", ""))
    # As the worker sees them: what ingest stores of each, or its refusal.
    results = [
        refused_json(e) if isinstance(e, Refused) else translate_events(mapping, [e], ctx)[0]
        for e in as_ingested_each(mapping.source_format, events)
    ]
    for i, result in enumerate(results):
        if len(results) > 1:
            print(f"# event {i}", file=out)
        if "outputs" in result:
            try:
                lines = [f"{o['kind']} {orjson.dumps(o['body']).decode()}" for o in result["outputs"]]
            except orjson.JSONEncodeError as exc:
                # as the worker does (render_error): mapped, but not writable as JSON
                lines = [f"failed: render_error (the mapped event cannot be written as JSON: {exc})"]
            for line in lines:
                print(line, file=out)
        else:
            status = next(k for k in ("discarded", "failed", "rejected") if k in result)
            detail = f" ({result['detail']})" if result.get("detail") else ""
            print(f"{status}: {result[status]}{detail}", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
