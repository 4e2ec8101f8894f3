"""HTTP handlers for MoEngage Streams: POST /moengage/streams/{source}, and the token
endpoint of its oauth2 sources (``oauth``)."""

from __future__ import annotations

import time

import orjson
import structlog
from aiohttp import web

from bridge.config.model import Config, SourceConfig, StreamsAuth
from bridge.httpx import (
    ApiError,
    OutOfRange,
    basic_credentials,
    check_containers,
    holds_out_of_range,
    json_response,
    parse_json,
    read_body,
    same_secret,
)
from bridge.routing import Routes
from bridge.sources.base import Collected, Ingestor, SourceKind, batch_answer, given_id, store_collected
from bridge.sources.encoding import too_deep
from bridge.sources.segment.spec import Invalid
from bridge.sources.streams.access import DECOY_SECRET, client_allowed
from bridge.sources.streams.oauth import TOKEN_PATH, TokenEndpoint
from bridge.sources.streams.oauth_tokens import token_key, token_problem
from bridge.sources.streams.spec import events_of, normalise

EVENTS_PATH = "/moengage/streams/{source}"
# Streams batches are ~100 events; attribute maps make them larger than Segment's.
MAX_STREAMS_BODY = 5 * 1024 * 1024
# One answer for an unknown source, a wrong or missing credential and an address outside
# allow_ips, so no answer tells which names exist, nor (from outside) whether a password is
# right; the first and the last are refused after comparisons with a decoy secret, so the
# time taken does not tell either. The real reason is logged (``streams_request_refused``).
_UNAUTHORIZED = "unknown source, or the request's credentials or address are not accepted"
# How much of a refused request's source name (the URL path, anyone's to write) is logged.
_LOGGED_NAME = 100
# RFC 7235 §3.1: a 401 names the schemes the resource takes. A client that sends its Basic
# credentials only when challenged (urllib's handler, Apache HttpClient by default) got a
# 401 without one, and never sent them: every batch refused, then dropped by MoEngage.
# Both schemes a source may take, on every refusal, so the header does not tell one source
# (or an unknown name) from another either.
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="moengage-streams", Bearer realm="moengage-streams"'}
_dumps = orjson.dumps
# What ``_compare_with_decoy`` checks Basic credentials and Bearer tokens against.
_DECOY_BASIC = StreamsAuth("basic", username=DECOY_SECRET, password=DECOY_SECRET)
_DECOY_OAUTH2 = StreamsAuth("oauth2", client_secret=DECOY_SECRET)
_DECOY_KEY = token_key(DECOY_SECRET)
# With no header-type source, a request with neither Basic nor Bearer credentials is refused
# by every source (but an open one) without a comparison: so is it for an unknown name.
_DECOY_NONE = StreamsAuth("none")

log = structlog.get_logger("bridge.sources.streams")


def _bearer_problem(request: web.Request, name: str, key: bytes) -> str | None:
    """Why the request's Bearer token does not let it into source ``name`` (whose token
    signing key is ``key``), or None when it does."""
    header = request.headers.get("Authorization", "")
    if not header:
        return "missing_credentials"
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return "malformed_authorization"
    # Expired, tampered with, another source's, or signed under an older secret.
    return token_problem(token.strip(), name, key)


def _refused(request: web.Request, source: str, reason: str, client: str | None = None) -> ApiError:
    """The one answer every refused request gets, with the real ``reason`` logged (never a
    credential: only which check failed)."""
    log.info(
        "streams_request_refused",
        source=source[:_LOGGED_NAME],
        reason=reason,
        client=client,
        remote=request.remote,
    )
    return ApiError(401, "unauthorized", _UNAUTHORIZED, headers=dict(_CHALLENGE))


class StreamsSources(SourceKind):
    kind = "moengage_streams"

    def __init__(self, config: Config, ingestor: Ingestor) -> None:
        self.config = config
        self.ingestor = ingestor
        self._by_name = {s.name: s for s in config.sources if s.kind == "moengage_streams"}
        # Derived once, not per request: each oauth2 source's token signing key.
        self._token_keys = {
            s.name: token_key(s.auth.client_secret)
            for s in self._by_name.values()
            if s.auth is not None and s.auth.type == "oauth2"
        }
        # A decoy of each header a header-type source names (see ``_compare_with_decoy``).
        headers = dict.fromkeys(s.auth.header for s in self._by_name.values() if s.auth and s.auth.type == "header")
        self._decoy_headers = [StreamsAuth("header", header=h, value=DECOY_SECRET) for h in headers] or [_DECOY_NONE]

    def add_routes(self, routes: Routes) -> None:
        token_endpoint = TokenEndpoint(self._by_name, self._token_keys, self.config.server.trusted_proxies)
        for path, handler in ((EVENTS_PATH, self.receive), (TOKEN_PATH, token_endpoint)):
            routes.add_post(path, handler)
            # The same route with a trailing slash, as a URL pasted into MoEngage's dashboard
            # may end: a redirect would not do, as many senders do not follow one on a POST.
            # Counted under the one route template in the metrics.
            routes.add_post(path + "/", handler, label=path)

    def _authorise(self, request: web.Request, source: SourceConfig) -> None:
        allowed, client = client_allowed(request, source, self.config.server.trusted_proxies)
        if not allowed:
            # Checked before the credentials: from outside, a password is never tried, but
            # the decoy's comparisons are made, as for a name that does not exist.
            self._compare_with_decoy(request, source.name)
            raise _refused(request, source.name, "ip_not_allowed", client)
        auth = source.auth
        if auth is None or auth.type == "none":
            return
        problem = self._credential_problem(request, source.name, auth, self._token_keys.get(source.name))
        if problem is not None:
            raise _refused(request, source.name, problem)

    def _compare_with_decoy(self, request: web.Request, name: str) -> None:
        """For a request refused before its credentials are compared (an unknown name, an
        address outside allow_ips): the comparisons a source of the kind its credentials are
        shaped for would make (Basic, a Bearer token, else a header a header-type source
        names), with ``DECOY_SECRET``, the outcome ignored. Without them such a refusal was
        the quickest answer, and the time taken told which names exist."""
        self._credential_problem(request, name, self._decoy_for(request), _DECOY_KEY)

    def _decoy_for(self, request: web.Request) -> StreamsAuth:
        scheme = request.headers.get("Authorization", "").partition(" ")[0].lower()
        if scheme == "basic":
            return _DECOY_BASIC
        if scheme == "bearer":
            return _DECOY_OAUTH2
        # The header a header-type source names that the request has (the first one named
        # when it has none: such a source still compares its value, "").
        return next((d for d in self._decoy_headers if d.header in request.headers), self._decoy_headers[0])

    @staticmethod
    def _credential_problem(request: web.Request, name: str, auth: StreamsAuth, key: bytes | None) -> str | None:
        """Why the request's credentials do not match ``auth`` (basic, header or oauth2,
        whose token ``key`` is given), or None when they do. Never says which part of a
        credential was wrong: that is for no log either."""
        if auth.type == "basic":
            try:
                creds = basic_credentials(request)
            except ApiError:
                # A malformed header: its own answer would tell a Basic source from a name
                # that does not exist.
                return "malformed_authorization"
            ok_user = same_secret(creds[0], auth.username) if creds else False
            ok_pass = same_secret(creds[1], auth.password) if creds else False
            return None if ok_user and ok_pass else "wrong_credentials" if creds else "missing_credentials"
        if auth.type == "oauth2":
            assert key is not None  # every oauth2 source's key is derived at the start
            return _bearer_problem(request, name, key)
        if auth.type == "none":
            return None  # only the decoy has no credentials to compare (_DECOY_NONE)
        given = request.headers.get(auth.header, "")
        return None if same_secret(given, auth.value) else "wrong_credentials" if given else "missing_credentials"

    async def receive(self, request: web.Request) -> web.Response:
        name = request.match_info["source"]
        source = self._by_name.get(name)
        if source is None:
            # Same answer as a wrong credential, after the same comparisons: do not reveal
            # which source names exist.
            self._compare_with_decoy(request, name)
            raise _refused(request, name, "unknown_source")
        self._authorise(request, source)
        body = await read_body(request, MAX_STREAMS_BODY)
        # Parsed and validated in a plain function, so the parsed body is freed before
        # the wait for the commit (see ``Collected``).
        collected = self._collect(source, body)
        if not collected.incoming and not collected.rejected:
            # {"events": []}, as a connectivity check sends: an accepted batch of nothing.
            return json_response(batch_answer(0, 0, []))
        return await store_collected(self.ingestor, collected)

    def _collect(self, source: SourceConfig, body: bytes) -> Collected:
        check_containers(body, self.config.server.max_batch_events)
        # A number no double holds (1e400) costs only the events that hold one, each
        # rejected by index: a 400 would cost every event of the batch (MoEngage retries it,
        # then drops it). Almost every body has none, and is never walked for them.
        out_of_range: list[OutOfRange] = []
        data = parse_json(body, out_of_range=out_of_range)
        try:
            items = events_of(data)
        except Invalid as exc:
            raise ApiError(400, exc.code, exc.message) from None
        limit = self.config.server.max_batch_events
        # MoEngage sends ~100 a request; thousands of tiny events in one body would make
        # one store write (and one answer) as large as the body allows. Past the limit the
        # first events are still taken: MoEngage resends a refused request unchanged, then
        # drops it, so a 400 cost every event of the batch (the Tracking API does the same).
        excess = len(items) - limit
        if excess > 0:
            items = items[:limit]
        collected = self.ingestor.collector(source)
        received = time.time()  # the time of an event that gives none (one for the request)
        for i, item in enumerate(items):
            try:
                if out_of_range and (found := holds_out_of_range(item)) is not None:
                    raise Invalid("number_out_of_range", f"a number is past the range of a double: {found.text[:40]}")
                event, uuid, key = normalise(item, received)
                try:
                    payload = _dumps([[event]])[2:-2]  # encode_event, written out: it runs per event
                except orjson.JSONEncodeError:
                    raise too_deep() from None
                collected.accept(event, uuid, key, payload)
            except Invalid as exc:
                collected.reject(i, exc.code, exc.message, given_id(item, "event_uuid"))
        if excess > 0:
            message = (
                f"the request has {limit + excess} events; the first {limit} are taken, and the {excess}"
                f" from index {limit} on are rejected"
            )
            collected.reject_from(limit, excess, "too_many_events", message)
        return collected
