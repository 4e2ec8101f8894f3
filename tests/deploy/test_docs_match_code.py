"""The README's checkable claims, checked: the metrics tables against what /metrics exports,
the admin routes it lists against the ones the app registers, the log lines it names against
the ones the code writes, the CLI commands and options it shows against the parser, its
configuration reference against the keys and defaults the config takes, and its links
against the files. Each holds both ways where both ways can be checked, so neither a new
metric or route nor a renamed one leaves the docs behind."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import pytest
from aiohttp import hdrs, web

from bridge.admin.routes import add_admin_routes
from bridge.cli import build_parser
from bridge.routing import Routes
from tests.observability.test_metrics import exercised

if TYPE_CHECKING:
    from bridge.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
METRIC_ROW = re.compile(r"^\| `(bridge_[a-z_]+)` \| (\w+) \| ([^|]*) \|", re.MULTILINE)


def flat(path: Path) -> str:
    """The text with its line breaks as spaces: the README wraps phrases across lines."""
    return re.sub(r"\s+", " ", path.read_text())


def exported_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (type, label names) of every family a running bridge exports: each helper is
    called once by ``exercised``, so every labelled family has a series to show its labels."""
    m = exercised()
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for family in m.registry.collect():
        assert family.samples, f"{family.name} has no series here: call its helper above"
        # prometheus_client names a counter's family without the `_total` its series carry.
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        found[name] = (family.type, labels)
    return found


def documented_metrics(doc: Path) -> dict[str, tuple[str, frozenset[str]]]:
    return {
        name: (kind, frozenset(re.findall(r"`([a-z_]+)`", labels)))
        for name, kind, labels in METRIC_ROW.findall(doc.read_text())
    }


@pytest.mark.parametrize("doc", ["README.md", "docs/operations.md"])
def test_the_metrics_table_is_every_exported_metric_with_its_type_and_labels(doc: str) -> None:
    exported, documented = exported_metrics(), documented_metrics(REPO / doc)
    assert not exported.keys() - documented.keys(), f"{doc}'s metrics table lacks {exported.keys() - documented.keys()}"
    assert not documented.keys() - exported.keys(), (
        f"{doc} names metrics never exported: {documented.keys() - exported.keys()}"
    )
    wrong = {n: (documented[n], exported[n]) for n in exported if documented[n] != exported[n]}
    assert not wrong, f"{doc}: (documented, exported) type and labels differ: {wrong}"


def registered_admin_routes() -> set[str]:
    router = web.UrlDispatcher()
    # The routes only hold the runtime: registering them runs nothing.
    add_admin_routes(Routes(router), cast("Runtime", SimpleNamespace()), "token")
    return {
        f"{route.method} {resource.canonical}"
        for resource in router.resources()
        for route in resource
        if route.method not in (hdrs.METH_HEAD, hdrs.METH_ANY) and "{rest" not in resource.canonical
    }


def documented_admin_routes(text: str) -> set[str]:
    """`GET /admin/x`, and `POST /admin/a/b|c` for two routes sharing a stem."""
    routes = set()
    for method, path in re.findall(r"`(GET|POST) (/admin/[^`?\s]+)", text):
        stem, _, last = path.rpartition("/")
        routes |= {f"{method} {stem}/{alt}" for alt in last.split("|")}
    return routes


def test_the_readme_lists_every_admin_route_and_no_other() -> None:
    registered, documented = registered_admin_routes(), documented_admin_routes(flat(README))
    assert "GET /admin/dlq/{id}" in registered  # the extraction above still sees templates
    assert not registered - documented, f"README's admin API lacks {registered - documented}"
    assert not documented - registered, f"README names admin routes that do not exist: {documented - registered}"


# How the README names a log line, wherever it does: "(`x` in the log)", "the `x` log line",
# "the log line `x`", "logs `x`", "the log (`x`)", "(`x` lines)", "one info line (`x`, ...)".
LOG_NAME_PATTERNS = (
    r"`([a-z_]+)` in the log",
    r"`([a-z_]+)` log line",
    r"log line `([a-z_]+)`",
    r"\blogs `([a-z_]+)`",
    r"log instead: `([a-z_]+)`",
    r"[Tt]he log \(`([a-z_]+)`\)",
    r"\(`([a-z_]+)` lines\)",
    r"info line \(`([a-z_]+)`",
)


def documented_log_events(text: str) -> set[str]:
    names = {n for pattern in LOG_NAME_PATTERNS for n in re.findall(pattern, text)}
    # The logging section names its lines first in each parenthesis, after "one line per ...":
    # "(`request_rejected`, at info)", "(`mappings_reloaded`, `mapping_reload_rejected`)".
    section = text[text.index("**Logs** are structlog") : text.index("Secrets never appear")]
    for run in re.findall(r"\((`[a-z_]+`(?:, `[a-z_]+`)*)[,:;)]", section):
        names |= set(re.findall(r"`([a-z_]+)`", run))
    return names


def emitted_log_events() -> set[str]:
    source = "\n".join(p.read_text() for p in (REPO / "bridge").rglob("*.py"))
    calls = r"\.(?:debug|info|warning|error|exception|critical)\(\s*"
    names = set(re.findall(calls + r'"([a-z_]+)"', source))
    names |= {n for pair in re.findall(calls + r'"([a-z_]+)" if .+? else "([a-z_]+)"', source) for n in pair}
    # A periodic task's failure and recovery lines, named where its FailureRun is made.
    names |= {n for pair in re.findall(r'FailureRun\(\s*"([a-z_]+)",\s*"([a-z_]+)"', source) for n in pair}
    # aiohttp's own records, renamed on their way through (observability/logging.py).
    names |= set(re.findall(r'record\.msg(?:, record\.args)? = "([a-z_]+)', source))
    return names


def test_every_log_line_the_readme_names_is_written_by_the_bridge() -> None:
    documented, emitted = documented_log_events(flat(README)), emitted_log_events()
    # The extraction still finds what the README names in each of its phrasings.
    assert {"request_rejected", "mapping_reload_rejected", "not_ready", "bad_http_request"} <= documented
    assert {"upstream_request", "clock_offset_from_database", "delivery_deferred"} <= documented
    assert not documented - emitted, f"README names log lines the bridge never writes: {documented - emitted}"


def documented_commands(text: str) -> dict[tuple[str, ...], set[str]]:
    """Each `bridge <command> [<action>]` the README shows (inline or in a shell block), with
    the options shown with it. `list|pause NAME|resume NAME` is three actions."""
    shown = re.findall(r"`(?:\.venv/bin/)?bridge ([a-z][^`]*)`", text.replace("\\|", "|"))
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        shown += re.findall(r"^(?:.*\| )?bridge ([a-z][^#\n]*)", block, re.MULTILINE)
    commands: dict[tuple[str, ...], set[str]] = {}
    for line in shown:
        words = line.split()
        command = words[0]
        actions = [a for w in words[1:2] for a in w.split("|") if re.fullmatch(r"[a-z]+", a)]
        actions += re.findall(r"\|([a-z]+)\b", line)
        paths: list[tuple[str, ...]] = [(command, a) for a in actions] or [(command,)]
        for path in paths:
            commands.setdefault(path, set()).update(re.findall(r"--[a-z][a-z-]*", line))
    return commands


def test_every_cli_command_and_option_the_readme_shows_exists(capsys: pytest.CaptureFixture[str]) -> None:
    commands = documented_commands(README.read_text())
    assert ("destinations", "resume") in commands and ("dlq", "replay") in commands
    assert "--all-destinations" in commands["dlq", "replay"]
    for path, options in sorted(commands.items()):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*path, "--help"])
        usage = capsys.readouterr()
        assert exit_.value.code == 0, (path, usage.err)
        missing = [o for o in options if not re.search(re.escape(o) + r"(?![\w-])", usage.out)]
        assert not missing, f"bridge {' '.join(path)} takes no {missing}"


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(doc: Path) -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    broken = [link for link in links if "://" not in link and not (doc.parent / link).exists()]
    assert not broken, broken


# -- the configuration reference ---------------------------------------------------------
# Its table (key, default, meaning) against the keys the config model takes, both ways.
CONFIG_ROW = re.compile(r"^\| `([a-z_.\[\]]+)` \| ([^|]*) \|", re.MULTILINE)


def documented_config() -> dict[str, str]:
    """key -> its Default cell, for every row of the README's configuration reference."""
    text = README.read_text()
    section = text[text.index("## Configuration reference") : text.index("## Mapping files")]
    return {key: default.strip() for key, default in CONFIG_ROW.findall(section)}


def config_defaults() -> dict[str, object]:
    """Every key bridge.yaml takes -> its default (``MISSING`` when it has none): the
    config's dataclasses hold one field per key, and each destination kind names its own."""
    import dataclasses
    import inspect

    from bridge.config import model
    from bridge.destinations.base import destination_kinds

    def fields_of(prefix: str, cls: type, skip: frozenset[str] = frozenset()) -> dict[str, object]:
        out: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            factory = f.default_factory
            out[prefix + f.name] = factory() if factory is not dataclasses.MISSING else f.default
        return out

    keys: dict[str, object] = {
        **fields_of("server.", model.ServerConfig),
        **fields_of("store.", model.StoreConfig),
        **fields_of("mappings.", model.MappingsConfig),
        "admin.token": "",
        "admin.metrics_token": "",
        **fields_of("sources[].", model.SourceConfig),
        **fields_of("sources[].auth.", model.StreamsAuth),
        **fields_of("destinations[].", model.DestinationConfig, skip=frozenset({"client"})),
        **fields_of("destinations[].delivery.", model.DeliveryConfig),
        **fields_of("destinations[].retry.", model.RetryConfig),
        **fields_of("destinations[].guard.", model.GuardConfig),
    }
    for kind in destination_kinds().values():
        params = inspect.signature(kind.__init__).parameters
        for key in kind.config_keys:
            default = params[key].default if key in params else dataclasses.MISSING
            keys.setdefault(
                f"destinations[].{key}", dataclasses.MISSING if default is inspect.Parameter.empty else default
            )
    return keys


def test_the_configuration_reference_is_every_key_the_config_takes() -> None:
    documented, taken = documented_config(), config_defaults()
    # Sections are documented by their keys (destinations[].delivery.batch_size, ...), and
    # auth's own keys in the `sources[].auth` row: `{type: basic, username, password}`, ...
    sections = {k.rsplit(".", 1)[0] for k in taken}
    auth_row = next(line for line in README.read_text().splitlines() if line.startswith("| `sources[].auth` |"))
    named = set(re.findall(r"\b([a-z_]+)\b", auth_row))
    undocumented = {
        k
        for k in taken.keys() - documented.keys() - sections
        if not (k.startswith("sources[].auth.") and k.rsplit(".", 1)[1] in named)
    }
    assert not undocumented, f"README's configuration reference lacks {sorted(undocumented)}"
    unknown = documented.keys() - taken.keys()
    assert not unknown, f"README documents keys the config does not take: {sorted(unknown)}"


def test_every_default_the_configuration_reference_spells_out_is_the_code_s() -> None:
    """A Default cell that starts with a literal (`72`, `false`, `` `bulk` (moengage)``) is
    that key's default in the code."""
    import dataclasses

    import yaml

    taken = config_defaults()
    checked = 0
    for key, cell in documented_config().items():
        literal = re.match(r"`([^`]+)`", cell)
        if literal is None or taken.get(key, None) in (None, dataclasses.MISSING):
            continue  # no literal, or a default the code computes (sources[].region's, by kind)
        assert yaml.safe_load(literal.group(1)) == taken[key], (key, cell, taken[key])
        checked += 1
    assert checked >= 40, checked  # the table's literal defaults are found, not skipped
