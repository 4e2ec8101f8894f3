"""The Segment sources remember authenticated Authorization headers, and nothing else."""

from __future__ import annotations

import base64
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.httpx import ApiError, header_digest
from bridge.sources.base import NoMetrics
from bridge.sources.segment import routes
from bridge.sources.segment.routes import SegmentSources


def _config() -> Any:
    us = SimpleNamespace(kind="segment", name="web", write_key="key-us", region="us")
    eu = SimpleNamespace(kind="segment", name="eu", write_key="key-eu", region="eu")
    server = SimpleNamespace(region="us", region_hosts={"eu": "events.eu1.segmentapis.com"}, max_event_bytes=32768)
    return SimpleNamespace(sources=[us, eu], server=server)


def _sources() -> SegmentSources:
    return SegmentSources(_config(), SimpleNamespace(metrics=NoMetrics()))  # type: ignore[arg-type]


def _request(header: str | None) -> Any:
    return SimpleNamespace(headers={} if header is None else {"Authorization": header})


def _basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _code(sources: SegmentSources, header: str | None) -> str:
    with pytest.raises(ApiError) as exc:
        sources._source_for_header(_request(header))
    return exc.value.code


def test_a_good_header_is_cached_and_gives_the_same_source() -> None:
    sources = _sources()
    first = sources._source_for_header(_request(_basic("key-us")))
    assert first is not None and first.name == "web"
    assert sources._by_header == {header_digest(_basic("key-us")): first}
    assert sources._source_for_header(_request(_basic("key-us"))) is first


def test_wrong_keys_wrong_regions_and_bad_headers_are_refused_every_time() -> None:
    sources = _sources()
    sources._source_for_header(_request(_basic("key-us")))
    for _ in range(2):
        assert _code(sources, _basic("key-wrong")) == "invalid_write_key"
        assert _code(sources, _basic("key-us-")) == "invalid_write_key"
        assert _code(sources, _basic("key-eu")) == "wrong_region"
        assert _code(sources, "Basic !!!") == "invalid_authorization"
        # An empty username names no key: the body's writeKey decides (and is checked then).
        assert sources._source_for_header(_request(_basic(""))) is None
    assert list(sources._by_header) == [header_digest(_basic("key-us"))]


def test_no_basic_header_means_no_source() -> None:
    sources = _sources()
    assert sources._source_for_header(_request(None)) is None
    assert sources._source_for_header(_request("Bearer abc")) is None
    assert sources._by_header == {}


def test_a_key_no_longer_configured_is_refused() -> None:
    # A config change builds new SourceKinds: nothing cached by the old one carries over.
    old = _sources()
    old._source_for_header(_request(_basic("key-us")))
    config = _config()
    config.sources = [s for s in config.sources if s.write_key != "key-us"]
    new = SegmentSources(config, SimpleNamespace(metrics=NoMetrics()))  # type: ignore[arg-type]
    assert _code(new, _basic("key-us")) == "invalid_write_key"


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "AUTH_CACHE_SIZE", 3)
    sources = _sources()
    for i in range(10):
        # Same key, different (ignored) passwords: distinct headers.
        assert sources._source_for_header(_request(_basic("key-us", f"p{i}"))) is not None
        assert len(sources._by_header) <= 3


def test_the_cache_is_looked_up_by_digest_never_by_the_header_as_sent() -> None:
    """A dict looked up by the raw header compares the caller's text with a cached header,
    which holds a write key: the lookup must not be a comparison of secrets (the README's
    constant-time rule), as the write-key lookup itself goes by digest."""
    sources = _sources()
    sources._source_for_header(_request(_basic("key-us")))
    keys: list[object] = list(sources._by_header)
    assert keys == [header_digest(_basic("key-us"))]
    assert _basic("key-us") not in keys


def test_a_header_aiohttp_could_not_decode_is_refused_not_a_crash() -> None:
    # aiohttp gives bytes that are not UTF-8 as lone surrogates (surrogateescape).
    header = "Basic " + base64.b64encode(b"key-us:").decode() + "\udcff"
    assert _code(_sources(), header) == "invalid_authorization"
