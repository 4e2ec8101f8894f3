"""OAuth2 token endpoint of a Streams source: POST /moengage/streams/{source}/oauth/token.

The client credentials grant of RFC 6749 §4.4, for a source with ``auth: {type: oauth2}``:
MoEngage authenticates with the source's client id and secret and gets a Bearer token
(see ``oauth_tokens``) that the Streams route then accepts.

Every answer carries RFC 6749 §5.2's ``error`` and ``error_description`` beside the
bridge's own ``code`` and ``message``. The checks that do not depend on the source (the
body, the grant type, how the client authenticates) come first, alike for every name; after
them an unknown name, a source that is not oauth2, an address outside ``allow_ips`` and a
wrong id or secret all get one ``invalid_client`` answer, after the same two comparisons
(the first four with a decoy secret), so neither an answer nor the time it takes tells which
source names exist or whether a secret was nearly right. The real reason is logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl, unquote_plus

import structlog
from aiohttp import web

from bridge.config.model import SourceConfig
from bridge.httpx import ApiError, basic_credentials, json_response, read_body, same_secret
from bridge.sources.client_ip import IPNetwork
from bridge.sources.streams.access import DECOY_SECRET, client_allowed
from bridge.sources.streams.oauth_tokens import issue_token

TOKEN_PATH = "/moengage/streams/{source}/oauth/token"
# A token request is a few short form fields: anything larger is not one.
MAX_TOKEN_REQUEST_BODY = 4096
FORM = "application/x-www-form-urlencoded"
GRANT_TYPE = "client_credentials"
# The parameters RFC 6749 gives this grant; any other is ignored (§3.2), these may not repeat.
_PARAMETERS = ("grant_type", "scope", "client_id", "client_secret")
# Tokens and refusals alike must not be kept by a cache on the way (RFC 6749 §5.1).
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# RFC 6749 §5.2: a 401 for a client that tried HTTP Basic names the scheme; given always,
# so the header does not tell one refusal from another either.
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="moengage-streams"'}
_INVALID_CLIENT = "unknown source, or the client's credentials or address are not accepted"
# How much of a refused request's source name (the URL path, anyone's to write) is logged.
_LOGGED_NAME = 100

log = structlog.get_logger("bridge.sources.streams")


def oauth_error(status: int, error: str, description: str, code: str | None = None) -> ApiError:
    """A refusal in both vocabularies: the bridge's ``code`` (``error`` unless given) and
    ``message``, and RFC 6749's ``error`` and ``error_description``."""
    text = _description(description)
    headers = {**_NO_STORE, **(_CHALLENGE if status == 401 else {})}
    return ApiError(status, code or error, text, extra={"error": error, "error_description": text}, headers=headers)


def _description(text: str) -> str:
    # RFC 6749 §5.2 allows printable ASCII but '"' and '\' in error_description.
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "'" if c == '"' else "?" for c in text)


class TokenEndpoint:
    """Issues access tokens for the oauth2 Streams sources among ``sources``."""

    def __init__(
        self,
        sources: Mapping[str, SourceConfig],
        keys: Mapping[str, bytes],
        trusted_proxies: Sequence[IPNetwork],
    ) -> None:
        self._sources = sources
        self._keys = keys  # each oauth2 source's token signing key, by name
        self._trusted_proxies = trusted_proxies

    async def __call__(self, request: web.Request) -> web.Response:
        name = request.match_info["source"]
        form = await _form(request)
        grant = form.get("grant_type")
        if grant is None:
            raise oauth_error(400, "invalid_request", "grant_type is required (client_credentials)")
        if grant != GRANT_TYPE:
            raise oauth_error(400, "unsupported_grant_type", f"grant_type must be {GRANT_TYPE}")
        client_id, client_secret = self._client_credentials(request, name, form)
        source = self._sources.get(name)
        refused = self._refusal(request, source)
        auth = source.auth if source is not None and refused is None else None
        # Both compared, always, and for every name: which one was wrong must not show in
        # the time taken, nor whether the name exists (or is an oauth2 source, or takes this
        # address): a name refused before its own secrets may be tried is compared with a
        # secret no source has.
        right_id = same_secret(client_id, auth.client_id if auth else DECOY_SECRET)
        right_secret = same_secret(client_secret, auth.client_secret if auth else DECOY_SECRET)
        if refused is not None:
            raise _invalid_client(request, name, *refused)
        assert auth is not None  # an oauth2 source (checked by _refusal)
        if not (right_id and right_secret):
            raise _invalid_client(request, name, "wrong_credentials")
        token = issue_token(name, self._keys[name], auth.token_ttl)
        log.info("streams_token_issued", source=name, expires_in=auth.token_ttl, remote=request.remote)
        body = {"access_token": token, "token_type": "Bearer", "expires_in": auth.token_ttl}
        return json_response(body, headers=dict(_NO_STORE))

    def _client_credentials(self, request: web.Request, name: str, form: Mapping[str, str]) -> tuple[str, str]:
        """(client_id, client_secret) from HTTP Basic or from the body (RFC 6749 §2.3.1).
        With HTTP Basic the body may repeat the client_id, not give a client_secret."""
        scheme = request.headers.get("Authorization", "").partition(" ")[0]
        if scheme.lower() == "basic":
            if "client_secret" in form:
                # RFC 6749 §2.3: a client uses one authentication method per request.
                raise oauth_error(
                    400,
                    "invalid_request",
                    "authenticate the client by HTTP Basic or by client_id and client_secret in the body, not both",
                )
            creds = _basic_client(request, name)
            # Many clients repeat their id in the body beside HTTP Basic (RFC 6749 §4.4.2's
            # example does not, but §3.2.1 lets a client name itself): taken when it is the
            # same id, so no request names two clients. Compared in constant time, as the
            # Basic id is compared with the configured one later.
            if "client_id" in form and not same_secret(form["client_id"], creds[0]):
                raise oauth_error(400, "invalid_request", "the client_id in the body is not the HTTP Basic client id")
            return creds
        if "client_id" not in form or "client_secret" not in form:
            raise _invalid_client(request, name, "missing_credentials")
        return form["client_id"], form["client_secret"]

    def _refusal(self, request: web.Request, source: SourceConfig | None) -> tuple[str, str | None] | None:
        """Why the client may not ask ``source`` for a token whatever its credentials, and
        the client's address to log (see ``client_allowed``); None when it may."""
        if source is None:
            return "unknown_source", None
        allowed, client = client_allowed(request, source, self._trusted_proxies)
        if not allowed:
            # Before the type and the credentials: from outside, nothing is learnt or tried
            # (the client's credentials are compared with the decoy, not the source's).
            return "ip_not_allowed", client
        if source.auth is None or source.auth.type != "oauth2" or source.name not in self._keys:
            return "not_an_oauth2_source", None
        return None


async def _form(request: web.Request) -> dict[str, str]:
    """The request's form parameters: each at most once, an empty one as if absent (§3.2)."""
    if request.content_type != FORM:
        raise oauth_error(400, "invalid_request", f"the body must be {FORM}")
    try:
        body = await read_body(request, MAX_TOKEN_REQUEST_BODY)
    except ApiError as err:
        # Too large, too slow, badly encoded: the status and code read_body gives, and an
        # RFC 6749 error beside them. Its headers too (Connection: close after a cut body).
        refusal = oauth_error(err.status, "invalid_request", err.message, code=err.code)
        refusal.headers.update(err.headers)
        raise refusal from None
    try:
        text = body.decode("utf-8").removeprefix("\ufeff")
        pairs = parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict")
    except ValueError:  # UnicodeDecodeError, raw or percent-encoded
        raise oauth_error(400, "invalid_request", "the form is not UTF-8") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key not in _PARAMETERS or value == "":
            continue
        if key in form:
            raise oauth_error(400, "invalid_request", f"{key} is given more than once")
        form[key] = value
    return form


def _basic_client(request: web.Request, name: str) -> tuple[str, str]:
    """The client id and secret of an HTTP Basic header, each form-urlencoded inside it."""
    try:
        creds = basic_credentials(request)
        if creds is None:  # "Basic" and nothing after it
            raise ValueError
        return unquote_plus(creds[0], errors="strict"), unquote_plus(creds[1], errors="strict")
    except (ApiError, ValueError):
        raise _invalid_client(request, name, "malformed_authorization") from None


def _invalid_client(request: web.Request, name: str, reason: str, client: str | None = None) -> ApiError:
    """The one answer every client that is not let in gets, its real ``reason`` logged
    (never a credential: only which check failed)."""
    log.info("streams_token_refused", source=name[:_LOGGED_NAME], reason=reason, client=client, remote=request.remote)
    return oauth_error(401, "invalid_client", _INVALID_CLIENT)
