"""Config files that cannot be read or used get a clear error, never a traceback, and
never echo a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    from bridge.config.loader import read_yaml
    from bridge.destinations.base import ConfigError

    cfg = tmp_path / "bridge.yaml"
    cfg.write_text("admin: {token: ${ADMIN_TOKEN}}\n")
    with pytest.raises(ConfigError) as exc:
        read_yaml(cfg, {"ADMIN_TOKEN": "*SuperSecretToken123"})
    assert "SuperSecretToken123" not in str(exc.value)


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
