"""Config files that cannot be read or used get a clear error, never a traceback, and
never echo a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.config.loader import read_yaml

# -- a config file that is not UTF-8 crashes every command reading it ------------


@pytest.mark.parametrize("command", [["check"], ["mappings", "check"], ["dlq", "list"]])
def test_non_utf8_config_is_a_config_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    from bridge.cli import main

    cfg = tmp_path / "bridge.yaml"
    cfg.write_bytes(b'server: {host: "caf\xe9"}\n')
    code = main([*command, "--config", str(cfg)])  # raised UnicodeDecodeError
    assert code != 0
    assert "UTF-8" in capsys.readouterr().err


# -- a secret from ${VAR} is echoed in a YAML error --------------------------------------


def test_config_yaml_error_does_not_echo_a_substituted_secret(tmp_path: Path) -> None:
    """A file that does not scan as YAML (the backtick) takes its values as they are: the
    alias the secret then makes is named without it."""
    from bridge.config.loader import read_yaml
    from bridge.destinations.base import ConfigError

    cfg = tmp_path / "bridge.yaml"
    cfg.write_text("admin: {token: ${ADMIN_TOKEN}}\nother: `x\n")
    with pytest.raises(ConfigError) as exc:
        read_yaml(cfg, {"ADMIN_TOKEN": "*SuperSecretToken123"})
    assert "undefined alias" in str(exc.value) and "SuperSecretToken123" not in str(exc.value), str(exc.value)


# -- a secret written in the file that YAML reads as a tag or an alias is echoed ----------


@pytest.mark.parametrize(
    "written",
    [
        "!Gen3rated-Pw9x",  # a tag: "could not determine a constructor for the tag '!Gen3rated-Pw9x'"
        "!!Gen3rated-Pw9x",
        "!<Gen3rated-Pw9x> x",
        "!Gen3rated!Pw9x x",  # "found undefined tag handle '!Gen3rated!'"
        "*Gen3rated-Pw9x",  # "found undefined alias 'Gen3rated-Pw9x'"
        "!!float Gen3rated-Pw9x",  # these three were a traceback quoting the value
        "!!bool Gen3rated-Pw9x",
        "!!timestamp Gen3rated-Pw9x",
    ],
)
def test_a_yaml_error_does_not_echo_a_secret_written_unquoted_in_the_file(tmp_path: Path, written: str) -> None:
    """A generated password often starts with '!' or '*': written unquoted, YAML reads it as
    a tag or an alias and its error quoted the name, that is the password, to `bridge check`
    and `bridge serve`. A value its tag does not fit was Python's own error, a traceback."""
    from bridge.destinations.base import ConfigError

    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(f"store:\n  url: sqlite:///x.db\nadmin:\n  token: {written}\n")
    with pytest.raises(ConfigError) as exc:
        read_yaml(cfg, {})
    message = str(exc.value)
    assert message.startswith(f"{cfg}:4:10: invalid YAML: "), message
    assert "Gen3rated" not in message and "Pw9x" not in message, message


# -- an unquoted ${VAR} whose value YAML reads otherwise is silently changed ---------------


@pytest.mark.parametrize(
    "value",
    [
        "abc #def",  # a comment: it was "abc"
        "&anchor",
        "*alias",
        "!First-Word-Of-Secret and-the-rest",  # a tag
        "|block",
        ">folded",
        "%directive",
        "@at",
        "`tick",
        "[flow",
        "{flow",
        "'single",
        '"double',
        "? key",
        "- item",
        "key: value",
        "a, b]",  # ends a flow collection early
        " padded ",
        "two\nlines",
        'back\\slash "and" quotes',
        "nul\x00tab\tline\u2028end",
    ],
)
def test_an_unquoted_reference_that_is_a_whole_scalar_reads_as_its_value(tmp_path: Path, value: str) -> None:
    """`password: ${PW}` with PW="abc #def" was "abc"; "&x" was an anchor, "*x" an alias."""
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text("password: ${PW} # a comment ${NOT_ASKED}\nadmin: {token: ${PW}, list: [${PW}, x]}\n")
    data, missing = read_yaml(cfg, {"PW": value})
    assert data == {"password": value, "admin": {"token": value, "list": [value, "x"]}}
    assert missing == set()


@pytest.mark.parametrize(
    ("value", "read"),
    [("8080", 8080), ("true", True), ("1.5", 1.5), ("~", None), ("", ""), ("abc def", "abc def"), ("a:b", "a:b")],
)
def test_an_unquoted_reference_whose_value_yaml_reads_as_itself_keeps_its_type(
    tmp_path: Path, value: str, read: object
) -> None:
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text("server: {port: ${V}}\nother: ${V}\n")
    data, _ = read_yaml(cfg, {"V": value})
    assert data == {"server": {"port": read}, "other": read}


def test_unset_unquoted_references_stay_empty(tmp_path: Path) -> None:
    # Empty, not null: null was "not given", so a setting with a default took it silently.
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text("a: ${UNSET}\nb: x${UNSET}y\nc: abc ${UNSET}\nd: [${UNSET}, x]\n")
    assert read_yaml(cfg, {}) == ({"a": "", "b": "xy", "c": "abc", "d": ["", "x"]}, {"UNSET"})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "store: {url: ${DATABASE_URL}}",
            "store.url: is empty; leave the key out to take its default ('sqlite:///var/bridge.db') "
            "(it is empty: is its environment variable set?)",
        ),
        (
            "server: {port: ${DATABASE_URL}}",
            "server.port: is empty; leave the key out to take its default (8088) "
            "(it is empty: is its environment variable set?)",
        ),
        (
            "destinations: [{name: d, kind: segment, mapping: m, delivery: {max_queued_events: ${DATABASE_URL}}}]",
            "destinations[0].delivery.max_queued_events: is empty; leave the key out to take its default "
            "(no limit) (it is empty: is its environment variable set?)",
        ),
        (
            "mappings: {watch: ${DATABASE_URL}}",
            "mappings.watch: is empty; leave the key out to take its default (false) "
            "(it is empty: is its environment variable set?)",
        ),
        (
            "mappings: {watch_interval: ${DATABASE_URL}}",
            "mappings.watch_interval: is empty; leave the key out to take its default (2.0) "
            "(it is empty: is its environment variable set?)",
        ),
    ],
)
def test_an_unset_unquoted_reference_is_not_taken_for_the_default(tmp_path: Path, line: str, message: str) -> None:
    """`store.url: ${DATABASE_URL}` unset put a PostgreSQL deployment on a SQLite file of its
    own: the quoted reference was refused, the unquoted one read as null, "not given"."""
    from bridge.config.model import load_config
    from bridge.destinations.base import ConfigError

    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(line + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg, {})
    assert str(exc.value) == message + "; the file's ${DATABASE_URL} is unset"


@pytest.mark.parametrize(
    ("text", "value", "column"),
    [
        ("dsn: postgres://u:${PW}@h/db", "abc #def", 19),  # '#def@h/db' became a comment
        ("dsn: postgres://u:${PW}@h/db", "p: q", 19),  # a mapping
        ("dsn: postgres://u:${PW}@h/db", "two\nlines", 19),  # folded into a space
        ("dsn: ${PW}@h/db", "&anchor", 6),
        ("dsn: ${PW}@h/db", " lead", 6),  # lost
        ("dsn: x${PW}", "trail ", 7),  # lost
        ("flow: [x${PW}, b]", "y, z", 9),  # a third item
        ("dsn: ${OK} ${PW}", "#def", 12),  # only the one misread is named
    ],
)
def test_an_unquoted_reference_in_part_of_a_scalar_whose_value_yaml_misreads_is_refused(
    tmp_path: Path, text: str, value: str, column: int
) -> None:
    from bridge.destinations.base import ConfigError

    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(f"server: {{}}\n{text}\n")
    with pytest.raises(ConfigError) as exc:
        read_yaml(cfg, {"PW": value, "OK": "ok"})
    assert str(exc.value) == (
        f"{cfg}:2:{column}: the value of ${{PW}} would change how YAML reads this unquoted scalar: "
        "put the whole scalar in double quotes"
    )


def test_values_together_misreading_a_scalar_are_named_together(tmp_path: Path) -> None:
    from bridge.destinations.base import ConfigError

    cfg = tmp_path / "bridge.yaml"
    cfg.write_text("dsn: a${A}${B}\n")
    with pytest.raises(ConfigError, match=r":1:7: the value of \$\{A\}, \$\{B\} would change"):
        read_yaml(cfg, {"A": "x ", "B": "#y"})  # "ax #y", though each alone reads as written
    assert read_yaml(cfg, {"A": "x", "B": "#y"})[0] == {"dsn": "ax#y"}


def test_a_value_in_part_of_a_scalar_that_reads_as_written_goes_in_as_it_is(tmp_path: Path) -> None:
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(
        "dsn: postgres://u:${PW}@h:${PORT}/db\n"
        "list: [a${X}, b]\n"
        'quoted: "postgres://u:${BAD}@h/db"\n'  # the fix the refusal asks for
        "block: |\n  ${BAD} ${X}\n"
    )
    data, _ = read_yaml(cfg, {"PW": "s3cr#t:x", "PORT": "5432", "X": "&*!", "BAD": 'a #b: "c'})
    assert data == {
        "dsn": "postgres://u:s3cr#t:x@h:5432/db",
        "list": ["a&*!", "b"],
        "quoted": 'postgres://u:a #b: "c@h/db',
        "block": 'a #b: "c &*!\n',
    }


def test_a_misread_reference_fails_bridge_check_on_one_line_without_its_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.cli import main

    cfg = tmp_path / "bridge.yaml"
    cfg.write_text('store: {url: "sqlite:///x.db"}\nother:\n  dsn: postgres://u:${PW}@h/db\n')
    monkeypatch.setenv("PW", "Secret-Value #tail")
    assert main(["check", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err == (
        f"config error: {cfg}:3:21: the value of ${{PW}} would change how YAML reads this unquoted scalar: "
        "put the whole scalar in double quotes\n"
    )


# -- a server port no socket takes passes `bridge check` -------------------------------


def test_server_port_above_65535_is_a_config_error(tmp_path: Path) -> None:
    from bridge.config.model import build_config
    from bridge.destinations.base import ConfigError

    with pytest.raises(ConfigError):
        build_config({"server": {"port": 70000}})


def test_a_key_given_twice_is_an_error_with_its_line(tmp_path: Path) -> None:
    """YAML's last-wins would drop the first section silently (mapping files refuse it too)."""
    from bridge.config.loader import read_yaml
    from bridge.destinations.base import ConfigError

    cfg = tmp_path / "bridge.yaml"
    for text, line, key in (
        ("store:\n  url: sqlite:///a.db\nserver: {}\nstore:\n  url: sqlite:///b.db\n", 4, "store"),
        ("store:\n  url: sqlite:///a.db\nserver: {port: 1, port: 2}\n", 3, "port"),
    ):
        cfg.write_text(text)
        with pytest.raises(ConfigError) as exc:
            read_yaml(cfg, {})
        assert f"{cfg}:{line}:" in str(exc.value) and f"duplicate key {key!r}" in str(exc.value), str(exc.value)
    cfg.write_text("base: &b {a: 1}\nmore:\n  <<: *b\n  c: 2\n")  # a merge key is not a duplicate
    assert read_yaml(cfg, {})[0]["more"] == {"a": 1, "c": 2}


@pytest.mark.parametrize("rate", [0, -5, "0/min", 0.0])
def test_a_rate_limit_of_zero_or_less_is_an_error_not_unlimited(rate: object) -> None:
    """A limiter keeps only rates above 0: 0 quietly meant no limit at all."""
    from bridge.config.model import parse_rate
    from bridge.destinations.base import ConfigError

    with pytest.raises(ConfigError) as exc:
        parse_rate(rate, "destinations[0].rate_limits.events")
    assert "above 0" in str(exc.value)


def test_config_merge_key_override_in_an_anchored_mapping_is_not_a_duplicate(tmp_path: Path) -> None:
    """A mapping that merges (<<) and overrides one merged key is valid YAML, and loaded
    before c0e2a43. When a shallower mapping merges it (`<<: *tuned`), PyYAML's
    flatten_mapping rewrites the anchored node in place (merged keys prepended) before the
    anchored mapping itself is constructed, and _UniqueKeysLoader then counts the merged
    key and the override as one key given twice."""
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "destinations:\n"
        "  - name: moe\n"
        "    delivery: &tuned\n"
        "      <<: {batch_size: 100, concurrency: 2}\n"
        "      concurrency: 4\n"
        "tuned_again:\n"
        "  <<: *tuned\n"
    )
    data, _ = read_yaml(path, env={})
    assert data["destinations"][0]["delivery"] == {"batch_size": 100, "concurrency": 4}


def test_config_a_real_duplicate_key_is_still_refused(tmp_path: Path) -> None:
    from bridge.destinations.base import ConfigError

    path = tmp_path / "bridge.yaml"
    path.write_text("server: {port: 1}\nserver: {port: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key"):
        read_yaml(path, env={})


# -- the store URL: a password cut short by / ? # is refused, an @ in a query value is not
@pytest.mark.parametrize(
    "url",
    [
        "postgresql://127.0.0.1:5432/test?application_name=bridge@node1",
        "postgresql://db.example.com/bridge?user=bridge@myserver",  # Azure single-server style user
        "postgresql:///test?host=/var/run/postgresql&application_name=a@b",
    ],
)
def test_a_postgres_url_with_an_at_sign_in_its_query_is_not_refused(url: str) -> None:
    """33f0465 refuses any PostgreSQL URL with an '@' after '://' and none in the netloc,
    so an '@' in a query value (asyncpg takes user, password, host, application_name there)
    makes `bridge check`/`serve` refuse a URL that connects (checked: asyncpg connects with
    the first one and reports application_name bridge@node1)."""
    from bridge.store import check_store_url

    check_store_url(url)


@pytest.mark.parametrize(
    "url", ["postgresql://u:p/x@localhost/db", "postgresql://u:pa?ss@localhost/db", "postgresql://u:pa#s@localhost/db"]
)
def test_a_password_holding_slash_query_or_hash_is_still_refused(url: str) -> None:
    from bridge.store import check_store_url

    with pytest.raises(ValueError, match="percent-encode"):
        check_store_url(url)


# -- config paths and files that are no config: one line, never a traceback ------------


def test_a_config_path_naming_an_endless_device_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`--config /dev/zero` read until memory ran out, then ended in a MemoryError traceback."""
    from bridge.cli import main

    assert main(["check", "--config", "/dev/zero"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: /dev/zero: cannot read config: larger than"), err


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("server:\n  port: " + "9" * 5000 + "\n", ":2:9:", "an integer of 5000 characters is too large"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", ":", "nested too deeply"),
        ("admin:\n  token: 'a\x07b'\n", ":2:12:", "unacceptable character #x0007"),
        ("server: {}\n\x00", ":2:1:", "unacceptable character #x0000"),
    ],
)
def test_yaml_a_parser_cannot_take_is_a_one_line_config_error(
    tmp_path: Path, text: str, where: str, problem: str
) -> None:
    """An integer of more than 4300 digits (ValueError) and thousands of nested brackets
    (RecursionError) were tracebacks; a control character's error spanned two lines and
    gave a character count, not a line."""
    from bridge.destinations.base import ConfigError

    path = tmp_path / "bridge.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        read_yaml(path, {})
    message = str(exc.value)
    assert message.startswith(f"{path}{where}") and problem in message, message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["directory", "not UTF-8"])
def test_the_sandbox_reads_a_bad_config_path_as_serve_does(tmp_path: Path, kind: str) -> None:
    """`bridge serve --sandbox` opened the file itself: IsADirectoryError or UnicodeDecodeError
    tracebacks where `bridge serve` says `config error:`."""
    from bridge.destinations.base import ConfigError
    from bridge.sandbox import sandbox_config

    path = tmp_path / "bridge.yaml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b'server: {host: "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"cannot read config|not UTF-8"):
        sandbox_config(str(path), "127.0.0.1", 0, {"us": 0, "eu": 0})


def test_the_sandbox_refuses_destinations_that_are_no_list_by_name(tmp_path: Path) -> None:
    """`destinations: 5` raised TypeError in the sandbox's rewriting of base URLs."""
    from bridge.destinations.base import ConfigError
    from bridge.sandbox import sandbox_config

    path = tmp_path / "bridge.yaml"
    path.write_text("destinations: 5\n")
    with pytest.raises(ConfigError, match=r"^destinations: expected a list, got an integer$"):
        sandbox_config(str(path), "127.0.0.1", 0, {"us": 0, "eu": 0})


@pytest.mark.parametrize("value", ["abc", "99999", "-1"])
def test_a_sandbox_port_variable_that_is_no_port_is_a_config_error(tmp_path: Path, value: str) -> None:
    """BRIDGE_SANDBOX_*_PORT was read with int() when bridge.sandbox was imported: a
    ValueError (or, past 65535, an OverflowError from bind) traceback, exit 1."""
    import os
    import subprocess
    import sys

    path = tmp_path / "bridge.yaml"
    path.write_text("destinations: 5\n")  # never served: the port is checked first
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), BRIDGE_SANDBOX_MOENGAGE_PORT=value)
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "serve", "--sandbox", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"config error: BRIDGE_SANDBOX_MOENGAGE_PORT: expected a port, 0 to 65535, got {value!r}\n"


# -- numbers no setting can be ------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf"), 10**400], ids=["nan", "inf", "-inf", "1e400"]
)
@pytest.mark.parametrize(
    "path",
    [
        ("server", "shutdown_timeout"),
        ("server", "idle_timeout"),
        ("store", "retention_hours"),
        ("mappings", "watch_interval"),
        ("destinations", 0, "delivery", "poll_interval"),
        ("destinations", 0, "delivery", "lease_seconds"),
        ("destinations", 0, "retry", "max_age"),
        ("destinations", 0, "guard", "threshold"),
    ],
)
def test_a_number_setting_must_be_finite(raw: dict[str, Any], path: tuple[str | int, ...], value: float) -> None:
    """YAML's .nan passed every range check (`nan < minimum` is false) and crashed the server
    when it slept that long ("cannot convert float NaN to integer"); .inf passed as well."""
    from tests.config.conftest import error_of

    node: Any = raw
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
    message = error_of(raw)
    assert message.startswith(f"{where}: expected a finite number, got "), message


@pytest.mark.parametrize(
    "path",
    [
        ("destinations", 0, "delivery", "batch_size"),
        ("destinations", 0, "guard", "window"),
        ("store", "max_bytes"),
        ("store", "min_free_disk_bytes"),
    ],
)
def test_an_integer_setting_past_64_bits_is_refused(raw: dict[str, Any], path: tuple[str | int, ...]) -> None:
    """`bridge check` passed them; serving, a batch size SQLite cannot bind failed every lease,
    and a guard window no deque takes stopped the start with an OverflowError traceback."""
    from tests.config.conftest import error_of

    node: Any = raw
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = 2**63
    if path[-1] == "window":
        node["min_events"] = 20
    where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
    message = error_of(raw)
    assert message.startswith(f"{where}: must be at most {2**63 - 1}"), message


@pytest.mark.parametrize("concurrency", [65, 10**20])
def test_more_delivery_loops_than_a_destination_has_connections_are_refused(
    raw: dict[str, Any], concurrency: int
) -> None:
    """10^20 loops hung the start (and SIGTERM with it); past 64 they only wait for one of
    the destination's pooled connections."""
    from bridge.config.model import build_config
    from tests.config.conftest import error_of

    raw["destinations"][0].setdefault("delivery", {})["concurrency"] = concurrency
    message = error_of(raw)
    assert message.startswith(f"destinations[0].delivery.concurrency: must be at most 64, got {concurrency}"), message
    raw["destinations"][0]["delivery"]["concurrency"] = 64
    assert build_config(raw).destinations[0].delivery.concurrency == 64


# -- values of the wrong shape -------------------------------------------------------------


@pytest.mark.parametrize("region", [["us"], [], {"us": 1}, {}])
def test_a_segment_destination_region_that_is_a_list_or_a_mapping_is_a_config_error(
    raw: dict[str, Any], region: object
) -> None:
    """`region not in HOSTS` raised TypeError (unhashable) for a list or a mapping."""
    from tests.config.conftest import error_of

    raw["destinations"][2]["region"] = region
    assert error_of(raw).startswith('destinations[2].region: must be "us" or "eu"')


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("http://[::1", "is not a usable URL: Invalid IPv6 URL"),
        ("http://127.0.0.1:abc", "is not a usable URL: Port could not be cast"),
        ("http://127.0.0.1:99999", "is not a usable URL: Port out of range"),
        ("http://moengage proxy.internal", "contains whitespace or a control character"),
    ],
)
def test_a_base_url_no_request_can_go_to_is_a_config_error(raw: dict[str, Any], value: str, problem: str) -> None:
    """An unclosed IPv6 bracket raised ValueError out of urlsplit (a traceback); a port that
    is no port, or a space in the host, passed `bridge check` and failed every delivery."""
    from tests.config.conftest import error_of

    raw["destinations"][0]["base_url"] = value
    message = error_of(raw)
    assert message.startswith(f"destinations[0].base_url: {problem}"), message


def test_a_region_host_with_an_unclosed_ipv6_bracket_is_a_config_error(raw: dict[str, Any]) -> None:
    from tests.config.conftest import error_of

    raw["server"]["region_hosts"] = {"eu": "https://[::1"}
    message = error_of(raw)
    assert message.startswith("server.region_hosts.eu: 'https://[::1' is not a usable URL or host"), message


@pytest.mark.parametrize("host", ["[::1]", "bridge host", "0.0.0.0/0", "host:8088"])
def test_a_listen_host_that_is_no_host_is_a_config_error(raw: dict[str, Any], host: str) -> None:
    """`bridge check` passed them; `bridge serve` then failed to listen, and building the
    error's URL raised ValueError: a traceback, exit 1, where a config error belongs."""
    from tests.config.conftest import error_of

    raw["server"]["host"] = host
    message = error_of(raw)
    assert message.startswith(f"server.host: {host!r} is no IP address or host name"), message


@pytest.mark.parametrize("host", ["::1", "fe80::1%eth0", "0.0.0.0", "localhost", "bridge-1.internal"])
def test_a_listen_host_that_is_an_address_or_a_name_is_taken(raw: dict[str, Any], host: str) -> None:
    from bridge.config.model import build_config

    raw["server"]["host"] = host
    assert build_config(raw).server.host == host


def test_an_unknown_rate_limit_bucket_is_named_by_its_key_with_a_hint(raw: dict[str, Any]) -> None:
    """The error named `destinations[0].rate_limits` alone, and offered no near bucket."""
    from tests.config.conftest import error_of

    raw["destinations"][0]["rate_limits"] = {"events": "100/s", "bulk_event": "100/s"}
    message = error_of(raw)
    assert message.startswith(
        "destinations[0].rate_limits.bulk_event: unknown bucket (did you mean 'bulk_events'?); moengage has "
    ), message


def test_a_streams_basic_username_with_a_colon_is_refused(raw: dict[str, Any]) -> None:
    """Basic credentials split at the first colon: no request could name user "moe:streams",
    so `bridge check` passed a source that refused every request (401)."""
    from tests.config.conftest import error_of

    raw["sources"][2]["auth"]["username"] = "moe:streams"
    assert error_of(raw).startswith("sources[2].auth.username: must not contain ':'")
    raw["sources"][2]["auth"].update(username="moe", password="pass:word")  # a colon in the password is fine
    from bridge.config.model import build_config

    assert build_config(raw).sources[2].auth is not None


@pytest.mark.parametrize("header", ["X Streams Key", "X-Streams-Key:", "X-Key\r\n"])
def test_a_streams_header_auth_whose_name_no_request_carries_is_refused(raw: dict[str, Any], header: str) -> None:
    from tests.config.conftest import error_of

    raw["sources"][2]["auth"] = {"type": "header", "header": header, "value": "streams-header-secret"}
    assert error_of(raw).startswith(f"sources[2].auth.header: {header!r} is no HTTP header name")


@pytest.mark.parametrize(
    "url",
    ["postgresql://bridge@db:abc/bridge", "postgres://bridge@db:99999/bridge", "postgresql://a:5432,b:0/bridge"],
)
def test_a_postgres_url_whose_port_is_no_port_is_refused_by_check(url: str) -> None:
    """`bridge check` passed it; `bridge serve` then stopped with the driver's
    "invalid literal for int()" (a store error, exit 1)."""
    from bridge.store import check_store_url

    with pytest.raises(ValueError, match=r"^a port in the PostgreSQL URL is not a number from 1 to 65535"):
        check_store_url(url)


@pytest.mark.parametrize(
    "url", ["postgresql://db:5432/bridge", "postgresql://a:5432,b:5433/bridge", "postgresql://[::1]:5432/bridge"]
)
def test_a_postgres_url_with_ports_or_several_hosts_is_taken(url: str) -> None:
    from bridge.store import check_store_url

    check_store_url(url)


def test_a_postgres_url_missing_its_host_does_not_echo_the_password_as_a_port() -> None:
    """Without "@host" the password is read as a port: `bridge check` passed the URL, and
    `bridge serve` printed it in the driver's error ("invalid literal for int() with base
    10: 'Secret-Pass-123'"). Now refused by check, without quoting it."""
    from bridge.config.model import build_config
    from bridge.destinations.base import ConfigError

    with pytest.raises(ConfigError) as exc:
        build_config({"store": {"url": "postgresql://bridge:Secret-Pass-123"}})
    assert "Secret-Pass-123" not in str(exc.value)


# -- `bridge check` with mappings.dir naming no directory printed a two-line mapping error ----


@pytest.mark.parametrize(("name", "problem"), [("nowhere", "does not exist"), ("bridge.yaml", "is not a directory")])
def test_a_mappings_dir_naming_no_directory_is_a_one_line_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str, problem: str
) -> None:
    """As every other config error: exit 2, "config error: <key>: ...", one line."""
    from bridge.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bridge.yaml").write_text(f'store: {{url: "sqlite:///x.db"}}\nmappings: {{dir: {name}}}\n')
    assert main(["check", "--config", "bridge.yaml"]) == 2
    assert capsys.readouterr().err == (
        f"config error: mappings.dir: {name!r} {problem} (relative to the working directory {tmp_path})\n"
    )


def test_serve_says_the_same_of_a_mappings_dir_naming_no_directory(raw: dict[str, Any], tmp_path: Path) -> None:
    from bridge.config.model import build_config
    from bridge.destinations.base import ConfigError
    from bridge.runtime import Runtime

    raw["mappings"] = {"dir": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError) as exc:
        Runtime(build_config(raw)).load_mappings()
    assert str(exc.value) == f"mappings.dir: {str(tmp_path / 'nowhere')!r} does not exist"


# -- a SQLite store path holding a NUL passed `bridge check`, and failed once served -------------


def test_a_sqlite_path_holding_a_nul_is_refused_by_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mappings").mkdir()
    (tmp_path / "bridge.yaml").write_text('store: {url: "sqlite:///var/a\\0b.db"}\n')  # YAML's \0 escape
    assert main(["check", "--config", "bridge.yaml"]) == 2
    assert capsys.readouterr().err == (
        "config error: store.url: store URL 'sqlite:///var/a\\x00b.db': the SQLite path holds a NUL character "
        "(character 6 of the path), which no file name can\n"
    )


# -- a misspelt required key was reported as the key it meant, missing --------------------


@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_misspelt_secret_key_is_one_line_naming_it_without_its_value(
    raw: dict[str, Any], tmp_path: Path, command: str
) -> None:
    """`pasword: ...` said `auth.password: is required`, naming no key the file holds."""
    import os
    import subprocess
    import sys

    import yaml

    auth = raw["sources"][2]["auth"]
    auth["pasword"] = auth.pop("password")
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", command, "--config", str(path)],
        env=dict(os.environ, PYTHONPATH=str(root)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == "config error: sources[2].auth.pasword: unknown key (did you mean 'password'?)\n"
    assert auth["pasword"] not in done.stdout + done.stderr


# -- a header value no request can carry passed `bridge check` ------------------------------


def _header_auth(raw: dict[str, Any], value: str) -> None:
    raw["sources"][2]["auth"] = {"type": "header", "header": "X-Streams-Key", "value": value}


@pytest.mark.parametrize(
    ("where", "put"),
    [
        ("admin.token", lambda raw, v: raw["admin"].update(token=v)),
        ("admin.metrics_token", lambda raw, v: raw["admin"].update(metrics_token=v)),
        ("sources[2].auth.value", _header_auth),
        ("destinations[0].workspace_id", lambda raw, v: raw["destinations"][0].update(workspace_id=v)),
    ],
)
@pytest.mark.parametrize("value", ["Header-Secret-42\n", " Header-Secret-42", "Header\x7fSecret-42"])
def test_a_setting_sent_in_a_header_that_no_header_carries_is_refused_without_its_value(
    raw: dict[str, Any], where: str, put: Any, value: str
) -> None:
    """A secret file's line break, kept by a quoted "${VAR}": a workspace id failed every
    delivery as a connection error (aiohttp refuses a control character in MOE-APPKEY),
    and a token or header value compared with a request's header (stripped, never holding
    a control character) refused every request, the right one included."""
    from tests.config.conftest import error_of

    put(raw, value)
    message = error_of(raw)
    assert message.startswith(f"{where}: starts or ends with whitespace, or holds a control character"), message
    assert "Secret-42" not in message


def test_a_header_setting_with_inner_spaces_or_other_scripts_is_taken(raw: dict[str, Any]) -> None:
    from bridge.config.model import build_config

    raw["admin"]["token"] = "two words"  # `Bearer two words` reaches the comparison whole
    raw["destinations"][0]["workspace_id"] = "ÉTÉ_123"
    cfg = build_config(raw)
    assert (cfg.admin_token, cfg.destinations[0].client.workspace_id) == ("two words", "ÉTÉ_123")  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["Secret\u00a042", "Secret\u200b42", "Secret\ue00042"])
def test_a_header_setting_with_an_inner_character_that_is_no_control_character_is_taken(
    raw: dict[str, Any], value: str
) -> None:
    """A no-break space, a zero-width space or a private-use character inside a value is
    neither whitespace at its ends nor a control character: a header carries it (UTF-8, as
    an aiohttp client sends it and the server reads it), and the README refuses neither."""
    from bridge.config.model import build_config

    _header_auth(raw, value)
    raw["admin"]["token"] = value
    cfg = build_config(raw)
    auth = cfg.sources[2].auth
    assert auth is not None
    assert (auth.value, cfg.admin_token) == (value, value)


@pytest.mark.parametrize("name", ["a{b}", "{x}", ".", ".."])
def test_a_streams_source_name_no_url_can_reach_is_refused(raw: dict[str, Any], name: str) -> None:
    """The name is the last segment of the URL MoEngage posts to: `bridge check` passed one
    no URL reaches, even percent-encoded, and every batch got a 404."""
    from tests.config.conftest import error_of

    raw["sources"][2]["name"] = name
    assert error_of(raw).startswith(f"sources[2].name: {name!r} cannot be the last segment of the Streams URL")


def test_a_segment_source_name_is_no_url_and_may_hold_a_slash(raw: dict[str, Any]) -> None:
    from bridge.config.model import build_config

    raw["sources"][0]["name"] = "web/prod"
    assert build_config(raw).sources[0].name == "web/prod"


# -- the broken files operators really write: each one line, naming what to change ------------

# A config as an operator writes one: block style, secrets from the environment.
OPERATOR_CONFIG = """\
server:
  host: 127.0.0.1
  port: 8088
store:
  url: "sqlite:///bridge.db"
mappings:
  dir: MAPPINGS
sources:
  - name: web
    kind: segment
    write_key: "${WRITE_KEY}"
    region: us
    to: [moengage-main]
  - name: streams-main
    kind: moengage_streams
    data_center: "01"
    auth:
      type: basic
      username: moe
      password: "${STREAMS_PASSWORD}"
    to: [segment-prod]
destinations:
  - name: moengage-main
    kind: moengage
    workspace_id: ${MOENGAGE_WORKSPACE_ID}
    api_key: "${MOENGAGE_API_KEY}"
    data_center: "01"
    mapping: segment-to-moengage
    mapping_options:
      anonymous_ids: true
    retry:
      retryable_statuses: [429, 500, 503]
  - name: segment-prod
    kind: segment
    write_key: "${SEGMENT_WRITE_KEY}"
    region: us
    mapping: moengage-to-segment
"""
OPERATOR_ENV = {
    "WRITE_KEY": "wk-source-1",
    "STREAMS_PASSWORD": "streams-pw-1",
    "MOENGAGE_WORKSPACE_ID": "WS1",
    "MOENGAGE_API_KEY": "moe-key-1",
    "SEGMENT_WRITE_KEY": "wk-dest-2",
}


@pytest.mark.parametrize(
    ("before", "after", "code", "message"),
    [
        # a wrong type, and the value given
        ("port: 8088", 'port: "80 88"', 2, 'server.port: expected an integer, got the string "80 88"'),
        (
            "      anonymous_ids: true",
            '      anonymous_ids: "yes"',
            1,
            'destinations[0].mapping_options.anonymous_ids: expected a boolean (true or false), got the string "yes"',
        ),
        # a key indented too little: named as the section's key it is
        (
            "    retry:\n      retryable_statuses",
            "    retry:\n    retryable_statuses",
            2,
            "destinations[0].retryable_statuses: unknown key here; it belongs in retry, indented under it "
            "(destinations[0].retry.retryable_statuses)",
        ),
        (
            "  host: 127.0.0.1\n  port: 8088",
            "  host: 127.0.0.1\nport: 8088",
            2,
            "port: unknown key here; it belongs in server, indented under it (server.port)",
        ),
        (
            "    auth:\n      type: basic\n      username: moe\n      password",
            "    auth:\n      type: basic\n    username: moe\n    password",
            2,
            "sources[1].username: unknown key here; it belongs in auth, indented under it (sources[1].auth.username)",
        ),
        # a list where a mapping is expected, and the other way round
        ('store:\n  url: "sqlite', 'store:\n  - url: "sqlite', 2, "store: expected a mapping, got a list"),
        (
            '  - name: web\n    kind: segment\n    write_key: "${WRITE_KEY}"\n    region: us\n'
            "    to: [moengage-main]\n  - name: streams-main",
            '  web:\n    kind: segment\n    write_key: "${WRITE_KEY}"\n    region: us\n'
            "    to: [moengage-main]\n  streams-main:\n    name: streams-main",
            2,
            "sources: expected a list, got a mapping (each item of a list starts with '- ')",
        ),
        (
            "    to: [segment-prod]",
            "    to: segment-prod",
            2,
            "sources[1].to: expected a list, got a string (a single item is still a list: [segment-prod])",
        ),
        # a bad item of a list
        (
            "[429, 500, 503]",
            "[429, 500, 700]",
            2,
            "destinations[0].retry.retryable_statuses[2]: 700 is not an HTTP status from 300 to 599",
        ),
        # two destinations of one name; an unknown kind; a top-level typo
        (
            "  - name: segment-prod\n",
            "  - name: moengage-main\n",
            2,
            "destinations[1].name: 'moengage-main' is used twice",
        ),
        (
            "kind: moengage_streams",
            "kind: moengage-streams",
            2,
            "sources[1].kind: must be one of segment, moengage_streams; got 'moengage-streams' "
            "(did you mean 'moengage_streams'?)",
        ),
        (
            "destinations:\n",
            "destinations:\nother:\n",
            2,
            "other: unknown key (the config takes admin, destinations, mappings, server, sources, store)",
        ),
        # an unset variable: the key says it is empty, the note says which variable
        (
            "${MOENGAGE_WORKSPACE_ID}",
            "${MOENGAGE_WORKSPACEID}",
            2,
            "destinations[0].workspace_id: must not be empty (is its environment variable set?); "
            "the file's ${MOENGAGE_WORKSPACEID} is unset",
        ),
    ],
)
def test_an_operator_s_broken_config_gets_one_precise_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    before: str,
    after: str,
    code: int,
    message: str,
) -> None:
    from bridge.cli import main

    cfg = _operator_config(tmp_path, monkeypatch, before, after)
    assert main(["check", "--config", str(cfg)]) == code
    err = capsys.readouterr().err
    # exit 2: the config itself; exit 1: it does not fit the mappings it names
    assert err == (f"config error: {message}\n" if code == 2 else f"{cfg}: {message}\n")


@pytest.mark.parametrize(
    ("before", "after", "where", "message"),
    [
        (
            "\n  port",
            "\n\tport",
            "3:1",
            "while scanning for the next token found character '\\t' that cannot start any token; indent with "
            "spaces: YAML does not allow tabs there",
        ),
        (
            "    region: us\n    to: [moengage-main]",
            "    region: us\n     to: [moengage-main]",
            "13:8",
            "mapping values are not allowed here; most often a key indented deeper than the keys beside it, "
            "or a value holding ': ' that needs quotes",
        ),
        (
            "    region: us\n    to: [moengage-main]",
            "    region us\n    to: [moengage-main]",
            "13:5",
            "could not find expected ':' (while scanning a simple key that starts at line 12, column 5); "
            "most often a key without its ':', or a quote or bracket left open",
        ),
        (
            "  - name: streams-main",
            " - name: streams-main",
            "14:2",
            "expected <block end>, but found '<block sequence start>' (while parsing a block mapping that starts "
            "at line 1, column 1); most often a line indented differently from the lines beside it",
        ),
        (
            "    to: [moengage-main]",
            "    to: [moengage-main",
            "14:9",
            "expected ',' or ']', but got ':' (while parsing a flow sequence that starts at line 13, column 9)",
        ),
    ],
)
def test_a_yaml_mistake_is_named_at_its_line_with_what_it_most_often_means(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    before: str,
    after: str,
    where: str,
    message: str,
) -> None:
    from bridge.cli import main

    cfg = _operator_config(tmp_path, monkeypatch, before, after)
    assert main(["check", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err == f"config error: {cfg}:{where}: invalid YAML: {message}\n"


def test_the_operator_config_itself_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the broken ones are broken from."""
    from bridge.cli import main

    cfg = _operator_config(tmp_path, monkeypatch, "", "")
    assert main(["check", "--config", str(cfg)]) == 0, capsys.readouterr().err


def _operator_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: str, after: str) -> Path:
    text = OPERATOR_CONFIG.replace("MAPPINGS", str(Path(__file__).resolve().parents[2] / "mappings"))
    assert before in text
    for name, value in OPERATOR_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(text.replace(before, after, 1))
    return cfg


def test_a_value_named_by_an_error_is_not_echoed_when_it_came_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errors now say what was given: a secret's variable written at the wrong key is not shown."""
    from bridge.cli import main

    cfg = _operator_config(tmp_path, monkeypatch, "port: 8088", "port: ${MOENGAGE_API_KEY}")
    monkeypatch.setenv("MOENGAGE_API_KEY", "Very-Secret-Api-Key-42")
    assert main(["check", "--config", str(cfg)]) == 2
    assert (
        capsys.readouterr().err == 'config error: server.port: expected an integer, got the string "<${VAR} value>"\n'
    )


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        # The value shown as JSON: a " or a \ in it written escaped.
        (
            "port: 8088",
            "port: ${MOENGAGE_API_KEY}",
            'server.port: expected an integer, got the string "<${VAR} value>"',
        ),
        # The value shown as Python writes it: a \ doubled.
        (
            "region: us",
            'region: "${MOENGAGE_API_KEY}"',
            "sources[0].region: must be one of us, eu; got '<${VAR} value>'",
        ),
    ],
)
def test_a_value_from_the_environment_is_not_echoed_escaped(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    before: str,
    after: str,
    message: str,
) -> None:
    """A secret holding a quote or a backslash was echoed in the error, escaped as the error
    quotes it, which the hiding did not recognise as the secret."""
    from bridge.cli import main

    cfg = _operator_config(tmp_path, monkeypatch, before, after)
    monkeypatch.setenv("MOENGAGE_API_KEY", 'Very"Secret\\Api-Key-42')
    assert main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Secret" not in err and "Api-Key" not in err, err
    assert err.startswith(f"config error: {message}"), err


def test_a_value_no_utf8_can_hold_named_by_an_error_is_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone surrogate (a byte of the environment that is no UTF-8 reaches Python as one,
    or a \\udcff escape in the file) quoted in "got the string ..." raised orjson's
    TypeError: a traceback, not the config error."""
    from bridge.cli import main

    cfg = _operator_config(tmp_path, monkeypatch, "port: 8088", 'port: "ab\\udcffcd"')
    assert main(["check", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err == 'config error: server.port: expected an integer, got the string "ab\\udcffcd"\n'
    cfg = _operator_config(tmp_path, monkeypatch, "port: 8088", "port: ${PORT_BYTES}")
    monkeypatch.setenv("PORT_BYTES", "Very-Secret-\udcff-Key-42")
    assert main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err == 'config error: server.port: expected an integer, got the string "<${VAR} value>"\n', err
