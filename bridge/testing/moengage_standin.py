"""A stand-in for MoEngage's Data API that answers like the real one, errors included.

Behaviour follows MoEngage's documented contract (shared/reference/moengage-api.md §1):
Basic auth (workspace id : Data API key), MOE-APPKEY equal to the username, JSON only,
128 KB per request (100 KB for Bulk Import), MissingAttributeError for incomplete
items (a device without its platform or push_id among them) sent alone, a 200 for a Bulk
Import it can read that drops each such element unseen, at most 50 merge pairs,
silent acceptance of customer ids MoEngage ignores, of devices of users it does not
have (it creates devices for existing users only) and of future-dated event actions,
Delete User's 400 for a user it does not have and its own 429 and 5xx bodies (a title
and a description, when ``plan`` or ``refuse_all`` refuses a deletion so), and
(``suspended``) each endpoint's answer for a suspended account: a 400 from Merge User, a
403 from the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
from aiohttp import web

from bridge.testing.upstream import StandIn, clip

MAX_BODY_BYTES = 128_000
MAX_BULK_BODY_BYTES = 100_000
MAX_MERGE_PAIRS = 50

# Ids MoEngage accepts with 200 but never turns into users (MoEngage Data API overview).
BLOCKED_CUSTOMER_IDS = frozenset(
    {
        "unknown",
        "guest",
        "null",
        "none",
        "0",
        "1",
        "-1",
        "-2",
        "2",
        "true",
        "false",
        "id",
        "uid",
        "user_id",
        "userid",
        "customer_id",
        "na",
        "n/a",
        "dummy_seller_code",
        "user_attribute_unique_id",
        "(empty)",
    }
)

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "Authentication required",
    403: "BlockedClient",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Authentication required.",
    413: "PayloadTooLarge",
    415: "MediaTypeError",
    429: "RateLimitError",
    500: "ServerError",
    502: "ServerError",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
_ERROR_MESSAGES = {
    400: "Bad Request",
    401: "Authentication Header Required",
    403: "Account Suspended",
    409: "Conflict",
    413: "Payload size exceeds 128 KB",
    415: "Unsupported Media Type",
    429: "Rate limit exceeded",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

# The type of every documented 401 (and, with a full stop, 409) of the Data API.
_AUTH = "Authentication required"
_MERGE_TOO_LARGE = "The payload can not exceed 128KB"
_KEY_MISMATCH = "App Secret key mismatch. Please login to the dashboard to verify key"
# MoEngage's answer for an app id it does not serve: a workspace sent to another data center.
_INVALID_APP_ID = "given app_id is invalid/blocked"

# A suspended account, as each endpoint answers it (MoE-spec): Merge User with a 400, Delete
# User with its 403 for a blocked app id, every other Data API endpoint with a 403.
_SUSPENDED = (403, "Your account is suspended. Please contact MoEngage team.", "Account Suspended")
_MERGE_SUSPENDED = (400, "Account Suspended.", "Account Suspended")
_DELETE_SUSPENDED = (403, _INVALID_APP_ID, "InvalidParams")

ACCEPTED = {"status": "success", "message": "Your request has been accepted and will be processed soon."}
MERGE_ACCEPTED = {"status": "success", "operation": "created"}
# Delete User's answer for a customer id without a user, MoEngage's wording (sic).
USER_ABSENT = "User doesn't exists with customer id {}"
# Delete User's 429, the one error MoEngage documents outside its {"error": {...}} envelope
# (shared/reference/moengage-api.md §1.5): a title and a description, no message or type.
DELETE_RATE_LIMITED = {
    "status": "fail",
    "title": "Rate limit exceeded",
    "description": "Exceeded rate limit for this url",
}
# Delete User's 5xx, in the same shape as its 429 (MoE-spec: title and description "in the
# case of 429 and 5xx errors").
DELETE_SERVER_ERROR = {"status": "fail", "title": "Internal Error", "description": "Please contact the MoEngage team."}


class Rejected(Exception):
    """A request MoEngage answers with an error; carries the answer."""

    def __init__(self, status: int, message: str, kind: str | None = None, attribute: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        # The payload attribute at fault, which MoEngage's envelope names for some 400s.
        self.attribute = attribute


@dataclass(frozen=True, slots=True)
class Ignored:
    """An item MoEngage acknowledged but silently dropped."""

    # "blocked_customer_id", "no_such_user" (a device of a user MoEngage does not have, or
    # a customer or event item with update_existing_only for one),
    # "future_dated" (an event item holding only its action whose current_time is ahead),
    # "malformed" (a Bulk Import element the single endpoint would answer with a 400)
    reason: str
    item: dict[str, Any]
    # For "malformed": the 400's message the single endpoint would give.
    detail: str = ""


def is_blocked_customer_id(value: str) -> bool:
    text = value.strip()
    return len(text) <= 1 or text.lower() in BLOCKED_CUSTOMER_IDS


class MoEngageStandIn(StandIn):
    name: ClassVar[str] = "moengage"

    def __init__(
        self,
        workspace_id: str,
        api_key: str,
        data_center: str = "01",
        *,
        workspaces: Mapping[str, str] | None = None,
        data_centers: Mapping[str, str] | None = None,
    ) -> None:
        """``workspaces``: further workspace id -> Data API key pairs to accept, as one
        MoEngage data center serves many workspaces (``workspace_id``'s own key wins).
        ``data_centers``: workspace id -> the data center it lives in (``data_center`` for
        any other). A request under ``/api-{dc}/`` is one sent to data center dc's host
        (api-{dc}.moengage.com), and a workspace of another data center is refused there;
        one without that prefix is sent to ``data_center``'s."""
        super().__init__()
        self.workspace_id = workspace_id
        self.api_key = api_key
        self.workspaces = {**(workspaces or {}), workspace_id: api_key}
        self.data_center = data_center
        self.data_centers = dict(data_centers or {})
        # Set it to answer every authenticated request as MoEngage answers a suspended account.
        self.suspended = False
        # Seconds a request to an endpoint ("customer", "event", "device", "transition",
        # "merge", "delete") waits before MoEngage takes it in: with a slow Track User, a
        # device sent beside its user, not after the user's answer, finds no user.
        self.delays: dict[str, float] = {}
        self.ignored: list[Ignored] = []
        self._customers: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._devices: list[dict[str, Any]] = []
        self._merges: list[dict[str, Any]] = []
        self._deletions: list[dict[str, Any]] = []
        # The customer ids MoEngage has a user for: made by a Track User or Create Event
        # item, moved by a merge, removed by a deletion (at once: MoEngage keeps a deleted
        # user for a 24 h buffer, which no test waits out).
        self._users: set[str] = set()

    # -- views -------------------------------------------------------------------

    def customers(self) -> list[dict[str, Any]]:
        """Every Track User item accepted (single endpoint and Bulk Import), in order."""
        return list(self._customers)

    def events(self) -> list[dict[str, Any]]:
        """Every Create Event item accepted (single endpoint and Bulk Import), in order."""
        return list(self._events)

    def devices(self) -> list[dict[str, Any]]:
        """Every Track Device item accepted for an existing user (single endpoint and Bulk
        Import), in order."""
        return list(self._devices)

    def merges(self) -> list[dict[str, Any]]:
        """Every merge pair accepted: {"merged_user", "retained_user"}."""
        return list(self._merges)

    def deletions(self) -> list[dict[str, Any]]:
        """Every Delete User body accepted (a user that existed), in order."""
        return list(self._deletions)

    def users(self) -> set[str]:
        """The customer ids of the users MoEngage has now."""
        return set(self._users)

    # -- the app -------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        # Merge and delete before the customer route: "/v1/customer/merge" would match {workspace}.
        # Each under "/api-{dc}" too: one stand-in serves every data center's host.
        return [
            route
            for prefix in ("", "/api-{dc}")
            for route in (
                web.post(f"{prefix}/v1/customer/merge", self._merge),
                web.post(f"{prefix}/v1/customer/delete", self._delete),
                web.post(f"{prefix}/v1/customer/{{workspace}}", self._customer),
                web.post(f"{prefix}/v1/event/{{workspace}}", self._event),
                web.post(f"{prefix}/v1/device/{{workspace}}", self._device),
                web.post(f"{prefix}/v1/transition/{{workspace}}", self._transition),
            )
        ]

    def error_body(self, status: int, message: str | None = None, kind: str | None = None) -> Any:
        return {
            "status": "fail",
            "error": {
                "message": message or _ERROR_MESSAGES.get(status, "Error"),
                "type": kind or _ERROR_TYPES.get(status, "Error"),
                "request_id": self.request_id(),
            },
        }

    def injected_error_body(self, request: web.Request, status: int) -> Any:
        if request.match_info.handler == self._delete:
            if status == 429:
                return dict(DELETE_RATE_LIMITED)
            if status >= 500:
                return dict(DELETE_SERVER_ERROR)
        return super().injected_error_body(request, status)

    async def _customer(self, request: web.Request) -> web.Response:
        await self._delay("customer")
        return await self._handle(request, self._accept_customer_request, MAX_BODY_BYTES)

    async def _event(self, request: web.Request) -> web.Response:
        await self._delay("event")
        return await self._handle(request, self._accept_event_request, MAX_BODY_BYTES)

    async def _device(self, request: web.Request) -> web.Response:
        await self._delay("device")
        return await self._handle(request, self._accept_device_request, MAX_BODY_BYTES)

    async def _transition(self, request: web.Request) -> web.Response:
        await self._delay("transition")
        return await self._handle(request, self._accept_transition, MAX_BULK_BODY_BYTES)

    async def _merge(self, request: web.Request) -> web.Response:
        await self._delay("merge")
        return await self._handle(request, self._accept_merge, MAX_BODY_BYTES, merge=True, suspended=_MERGE_SUSPENDED)

    async def _delete(self, request: web.Request) -> web.Response:
        await self._delay("delete")
        return await self._handle(
            request,
            self._accept_delete,
            MAX_BODY_BYTES,
            app_id_in_query=True,
            suspended=_DELETE_SUSPENDED,
            invalid_app_id_status=_DELETE_SUSPENDED[0],
        )

    async def _delay(self, endpoint: str) -> None:
        delay = self.delays.get(endpoint, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _handle(
        self,
        request: web.Request,
        accept: Callable[[dict[str, Any]], str],
        max_bytes: int,
        merge: bool = False,
        app_id_in_query: bool = False,
        suspended: tuple[int, str, str] = _SUSPENDED,
        invalid_app_id_status: int = 400,
    ) -> web.Response:
        try:
            self._authenticate(
                request,
                merge=merge,
                app_id_in_query=app_id_in_query or merge,
                invalid_app_id_status=invalid_app_id_status,
            )
            if self.suspended:
                raise Rejected(*suspended)
            if request.content_type != "application/json":
                raise Rejected(415, _ERROR_MESSAGES[415], "MediaTypeError")
            raw = await request.read()
            if len(raw) > max_bytes:
                # Merge User words its 413 its own way (MoE-spec).
                too_large = _MERGE_TOO_LARGE if merge else f"Payload size exceeds {max_bytes // 1000} KB"
                raise Rejected(413, too_large, "PayloadTooLarge")
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise Rejected(400, f"Malformed JSON: {exc}", "Malformed JSON") from None
            if not isinstance(body, dict):
                raise Rejected(400, "Malformed JSON: the body must be a JSON object", "Malformed JSON")
            already_ignored = len(self.ignored)
            summary: str = accept(body)
        except Rejected as rejected:
            self.note(request, error=rejected.message)
            body = self.error_body(rejected.status, rejected.message, rejected.kind)
            if rejected.attribute is not None:
                body["error"] = {"attribute": rejected.attribute, **body["error"]}
            return self.json_response(rejected.status, body)
        self.record(request, body, len(raw))
        # What real MoEngage would accept and then drop without a word, shown (with why) on
        # the sandbox's log line, which is the only place a sandbox user can see it.
        ignored = self.ignored[already_ignored:]
        if ignored:
            shown = [
                {"reason": i.reason, **({"detail": i.detail} if i.detail else {}), "item": i.item} for i in ignored
            ]
            self.note(request, summary=f"{summary} ignored={len(ignored)}", body=clip(body), ignored=clip(shown))
        else:
            self.note(request, summary=summary, body=clip(body))
        return self.json_response(200, MERGE_ACCEPTED if merge else ACCEPTED)

    def _authenticate(
        self, request: web.Request, *, merge: bool, app_id_in_query: bool, invalid_app_id_status: int
    ) -> None:
        header = request.headers.get("Authorization")
        if not header:
            raise Rejected(401, "Authentication Header Required", _AUTH)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            raise Rejected(
                401,
                "Invalid authorization used. MoEngage only supports 'Basic Auth' authorization.",
                _AUTH,
            )
        try:
            username, _, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Rejected(401, "Authentication Header Malformed", _AUTH) from None
        self._check_data_center(request, username, invalid_app_id_status)
        if username not in self.workspaces or password != self.workspaces[username]:
            raise Rejected(401, _KEY_MISMATCH, _AUTH)
        appkey = request.headers.get("MOE-APPKEY")
        if appkey is None and not merge:  # merge callers may omit it; data calls may not
            raise Rejected(401, "MOE-APPKEY header is required", _AUTH)
        if appkey is not None and appkey != username:
            raise Rejected(
                401,
                "MOE_APPKEY doesn't match the Username (APP_KEY) used in Basic Auth authorization.",
                _AUTH,
            )
        target = request.query.get("app_id") if app_id_in_query else request.match_info.get("workspace")
        if not target:
            raise Rejected(400, "app_id is required", "InvalidParams")
        if target != username:
            raise Rejected(409, "App key mismatch in params and authentication.", f"{_AUTH}.")

    def _check_data_center(self, request: web.Request, workspace: str, status: int) -> None:
        """A workspace lives in one data center; another's host does not know its app id.
        ``status``: the endpoint's status for an invalid app id, a 400 but for Delete User's
        403 (MoEngage's Delete User documents "given app_id is invalid/blocked" as a 403)."""
        if workspace not in self.workspaces:
            return  # unknown everywhere: the key check refuses it
        sent_to = request.match_info.get("dc", self.data_center)
        if self.data_centers.get(workspace, self.data_center) != sent_to:
            raise Rejected(status, _INVALID_APP_ID, "InvalidParams")

    # -- validation and recording ----------------------------------------------------

    def _keep_user_item(self, item: dict[str, Any], into: list[dict[str, Any]]) -> None:
        if is_blocked_customer_id(item["customer_id"]):
            self.ignored.append(Ignored("blocked_customer_id", item))
        elif into is self._devices and item["customer_id"] not in self._users:
            # "Devices can be created for existing users only": the call is accepted (MoEngage
            # processes it later) and no device is made (shared/reference/moengage-api.md §1.4
            # Track Device, and §1.5: 200 "will be processed soon"). A device that reaches it
            # before, or beside, its new user's Track User is lost so.
            self.ignored.append(Ignored("no_such_user", item))
        elif item.get("update_existing_only") is True and item["customer_id"] not in self._users:
            # "unknown customer_ids are not created" (shared/reference/moengage-api.md §1.4,
            # Track User); Segment's MoEngage action gives events the flag to the same end,
            # updates for existing users only. Accepted; neither the user nor its actions kept.
            self.ignored.append(Ignored("no_such_user", item))
        else:
            if into is self._events:
                kept = self._drop_future_actions(item)
                if kept is None:
                    return
                item = kept
            into.append(item)
            if into is not self._devices:  # a device is only ever added to an existing user
                self._users.add(item["customer_id"])

    def _drop_future_actions(self, item: dict[str, Any]) -> dict[str, Any] | None:
        """The event item without its future-dated actions (None when none is left).

        "MoEngage does not accept any future dated events" (shared/reference/moengage-api.md
        §1.4, MoE-spec Track Event note). The reference documents no error for them, and a
        Create Event call is answered 200 "will be processed soon" before MoEngage processes
        it (§1.5): like the other data it refuses after that answer, such an action is
        acknowledged and lost, so it is recorded in ``ignored``, not answered with an error.
        """
        now = time.time()
        kept: list[dict[str, Any]] = []
        for action in item["actions"]:
            if _is_future(action.get("current_time"), now):
                self.ignored.append(Ignored("future_dated", {**item, "actions": [action]}))
            else:
                kept.append(action)
        if len(kept) == len(item["actions"]):
            return item
        return {**item, "actions": kept} if kept else None

    def _accept_customer_request(self, body: dict[str, Any]) -> str:
        _check_user_item(body, "customer", where="")
        self._keep_user_item(body, self._customers)
        return f"customer {body['customer_id']!r}"

    def _accept_event_request(self, body: dict[str, Any]) -> str:
        _check_user_item(body, "event", where="")
        self._keep_user_item(body, self._events)
        return f"event for {body['customer_id']!r}: {_action_names(body)}"

    def _accept_device_request(self, body: dict[str, Any]) -> str:
        _check_user_item(body, "device", where="")
        self._keep_user_item(body, self._devices)
        return f"device for {body['customer_id']!r}: {body['attributes']['platform']}"

    def _accept_transition(self, body: dict[str, Any]) -> str:
        if body.get("type") != "transition":
            raise Rejected(400, "type should be transition", "InvalidParams")
        elements = body.get("elements")
        if not isinstance(elements, list) or not elements:
            raise Rejected(400, "'elements cannot be empty array", "MissingAttributeError", "elements")
        for element in elements:
            # The one element error MoEngage documents answering a Bulk Import with
            # (shared/reference/moengage-api.md §1.5): the request itself is refused.
            if not isinstance(element, dict) or element.get("type") not in ("customer", "event", "device"):
                raise Rejected(400, "'type in elements should be customer/event/device", "AttributeError", "type")
        counts = {"customer": 0, "event": 0, "device": 0}
        targets = {"customer": self._customers, "event": self._events, "device": self._devices}
        for index, element in enumerate(elements):
            counts[element["type"]] += 1
            try:
                _check_user_item(element, element["type"], where=f"elements[{index}].")
            except Rejected as refused:
                # "All bulk API requests return a 200 response code. Debugging should be done
                # on the user profile on the dashboard" (§1.3): an element the single endpoint
                # would answer with a 400 is acknowledged with the others and lost.
                self.ignored.append(Ignored("malformed", element, refused.message))
                continue
            self._keep_user_item(element, targets[element["type"]])
        return f"bulk customers={counts['customer']} events={counts['event']} devices={counts['device']}"

    def _accept_merge(self, body: dict[str, Any]) -> str:
        pairs = body.get("merge_data")
        if not isinstance(pairs, list) or not pairs:
            raise Rejected(400, "merge_data can not be empty Array", "MissingAttributeError")
        if len(pairs) > MAX_MERGE_PAIRS:
            raise Rejected(
                400,
                f"merge_data can have at most {MAX_MERGE_PAIRS} entries, got {len(pairs)}",
                "InvalidParams",
            )
        for index, pair in enumerate(pairs):
            if not isinstance(pair, dict):
                raise Rejected(400, f"merge_data[{index}] must be an object", "InvalidParams")
            for key in ("merged_user", "retained_user"):
                value = pair.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise Rejected(
                        400, f"merge_data[{index}].{key} is not found in the payload", "MissingAttributeError"
                    )
        for pair in pairs:
            # A failing pair is skipped and the others continue (MoEngage Merge User).
            if is_blocked_customer_id(pair["merged_user"]) or is_blocked_customer_id(pair["retained_user"]):
                self.ignored.append(Ignored("blocked_customer_id", pair))
            else:
                self._merges.append(pair)
                # The merged user's data moves into the retained user; the merged one is gone.
                self._users.discard(pair["merged_user"])
                self._users.add(pair["retained_user"])
        return f"merge pairs={len(pairs)}"

    def _accept_delete(self, body: dict[str, Any]) -> str:
        identity_type = body.get("identity_type")
        value = body.get("identity_value")
        if not isinstance(identity_type, str) or not identity_type:
            raise Rejected(400, "identity_type is not found in the payload", "MissingAttributeError")
        if identity_type != "customer_id":
            # MoEngage also takes its own moengage_id, which no bridge call ever learns.
            raise Rejected(400, f"identity_type {identity_type!r} is not supported", "InvalidParams")
        if not isinstance(value, str) or not value.strip():
            raise Rejected(400, "identity_value can not be empty Unicode String", "MissingAttributeError")
        if value not in self._users:
            raise Rejected(400, USER_ABSENT.format(value), "Not Found")
        self._users.discard(value)
        self._deletions.append(body)
        return f"delete {value!r}"


def _check_user_item(item: dict[str, Any], kind: str, *, where: str) -> None:
    if item.get("type") not in (None, kind):
        raise Rejected(400, f"{where}type should be {kind}", "InvalidParams")
    customer_id = item.get("customer_id")
    if not isinstance(customer_id, str) or not customer_id.strip():
        raise Rejected(400, f"{where}customer_id can not be empty Unicode String", "MissingAttributeError")
    attributes = item.get("attributes")
    if attributes is not None and not isinstance(attributes, dict):
        raise Rejected(400, f"{where}attributes should be an object", "InvalidParams")
    if kind == "device":
        # Track Device requires attributes.platform and attributes.push_id (MoE-spec).
        for key in ("platform", "push_id"):
            value = attributes.get(key) if attributes is not None else None
            if not isinstance(value, str) or not value.strip():
                raise Rejected(400, f"{where}attributes.{key} is not found in the payload", "MissingAttributeError")
        return
    if kind != "event":
        return
    actions = item.get("actions")
    if not isinstance(actions, list) or not actions:
        raise Rejected(400, f"{where}actions can not be empty Array", "MissingAttributeError")
    for index, action in enumerate(actions):
        name = action.get("action") if isinstance(action, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise Rejected(400, f"{where}actions[{index}]: action is not found in the payload", "MissingAttributeError")


def _is_future(current_time: Any, now: float) -> bool:
    """Whether an action's current_time is later than ``now`` (epoch seconds). MoEngage
    documents epoch seconds or ISO 8601 (UTC when no zone is given); its own sample sends
    a 13-digit millisecond string, so a number that large is read as milliseconds, the
    lenient reading. A value neither reads as is not judged here."""
    if isinstance(current_time, str) and current_time.strip().isdigit():
        current_time = int(current_time)
    if type(current_time) in (int, float):
        seconds = current_time / 1000 if current_time >= 1e11 else current_time
        return bool(seconds > now)
    if not isinstance(current_time, str):
        return False
    try:
        when = datetime.fromisoformat(current_time.strip())
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp() > now


def _action_names(item: dict[str, Any]) -> str:
    return ", ".join(str(action.get("action")) for action in item.get("actions", []))
