"""MoEngage Data API client: Bulk Import, Track User, Create Event, Track Device, Merge User and
Delete User."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from operator import attrgetter
from types import MappingProxyType
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import orjson

from bridge.config_values import check_header_safe
from bridge.destinations import http
from bridge.destinations.base import ConfigError, Destination, Item, RateCost, Request, Response, register
from bridge.destinations.config import check_keys, optional_base_url, optional_int, required_str
from bridge.destinations.moengage.datacenters import REGIONS, default_base_url, normalise_data_center
from bridge.destinations.packing import chunk, json_array, json_object

Api = Literal["bulk", "single"]

BULK = "bulk"
MERGE = "merge"
CUSTOMER = "customer"
EVENT = "event"
DELETE = "delete"
DEVICE = "device"
OUTPUT_KINDS = (CUSTOMER, EVENT, MERGE, DELETE, DEVICE)
_OUTPUT_KIND_SET = frozenset(OUTPUT_KINDS)
# Kinds sent to an endpoint of their own (named as the kind) whatever the `api` setting:
# Bulk Import takes only users, events and devices.
OWN_ENDPOINT_KINDS = frozenset({MERGE, DELETE})
# Kinds Bulk Import takes (with `api: bulk`).
_BULK_KINDS = frozenset({CUSTOMER, EVENT, DEVICE})
_OUTPUT_KIND = attrgetter("output.kind")  # of an Item
_ENCODED = attrgetter("encoded")  # of an Item
# Endpoints whose documented cap counts the items of a request, and the rate-limit bucket
# each takes from. Delete User takes one user a request, so one item is one token.
_ITEM_BUCKETS = {CUSTOMER: "users", MERGE: "merge", DELETE: "delete", DEVICE: "devices"}

BULK_MAX_BYTES = 100_000  # Bulk Import's documented cap per call
SINGLE_MAX_BYTES = 128_000  # every other Data API endpoint (413 above it)
MERGE_MAX_PAIRS = 50
PER_MINUTE = 60.0

# Envelope bytes around the comma-separated items, for exact size accounting.
_BULK_ENVELOPE = len(orjson.dumps({"type": "transition", "elements": []}))
_TRANSITION = orjson.dumps("transition")
_MERGE_ENVELOPE = len(orjson.dumps({"merge_data": []}))

_KEYS = frozenset({"name", "kind", "workspace_id", "api_key", "data_center", "base_url", "api", "max_request_bytes"})


@register
class MoEngageDestination(Destination):
    kind: ClassVar[str] = "moengage"
    config_keys: ClassVar[frozenset[str]] = _KEYS

    def __init__(
        self,
        *,
        name: str,
        workspace_id: str,
        api_key: str,
        data_center: str,
        base_url: str | None = None,
        api: Api = "bulk",
        max_request_bytes: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.workspace_id = workspace_id
        self.data_center = data_center
        self.region = REGIONS[data_center]
        self.api: Api = api
        self.base_url = base_url or default_base_url(data_center)
        self.timeout = timeout
        self._api_key = api_key
        # A configured cap only lowers MoEngage's own: above it every request is a 413.
        self._bulk_max = min(max_request_bytes or BULK_MAX_BYTES, BULK_MAX_BYTES)
        self._merge_max = min(max_request_bytes or SINGLE_MAX_BYTES, SINGLE_MAX_BYTES)
        self._headers = {
            "Authorization": http.basic_auth(workspace_id, api_key),
            "MOE-APPKEY": workspace_id,
            "Content-Type": "application/json",
        }
        ws = quote(workspace_id, safe="")
        self._urls = {
            BULK: f"{self.base_url}/v1/transition/{ws}",
            CUSTOMER: f"{self.base_url}/v1/customer/{ws}",
            EVENT: f"{self.base_url}/v1/event/{ws}",
            DEVICE: f"{self.base_url}/v1/device/{ws}",
            MERGE: f"{self.base_url}/v1/customer/merge?app_id={ws}",
            DELETE: f"{self.base_url}/v1/customer/delete?app_id={ws}",
        }
        self._http = http.LazySession(timeout)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str, timeout: float) -> MoEngageDestination:
        check_keys(cfg, cls.config_keys, where)
        api = cfg.get("api", "bulk")
        if api not in ("bulk", "single"):
            raise ConfigError(f'{where}.api: must be "bulk" or "single", got {api!r}')
        if "data_center" not in cfg or cfg["data_center"] is None:
            raise ConfigError(f"{where}.data_center: required")
        workspace_id = required_str(cfg, "workspace_id", where)
        # Sent as it is in the MOE-APPKEY header: aiohttp refuses a control character there,
        # and every delivery failed as a connection error, retried for hours, after a passing check.
        check_header_safe(
            workspace_id, f"{where}.workspace_id", "it is sent as the MOE-APPKEY header, so every delivery would fail"
        )
        api_key = required_str(cfg, "api_key", where)
        # A secret file's line break, kept by a quoted "${VAR}", goes into the Basic
        # credentials unseen: MoEngage answers every request 401. Never quoted: a secret.
        check_header_safe(
            api_key, f"{where}.api_key", "no Data API key does, and MoEngage would answer every request 401"
        )
        return cls(
            name=cfg["name"] if isinstance(cfg.get("name"), str) else cls.kind,
            workspace_id=workspace_id,
            api_key=api_key,
            data_center=normalise_data_center(cfg["data_center"], f"{where}.data_center"),
            base_url=optional_base_url(cfg, "base_url", where),
            api=api,
            max_request_bytes=optional_int(
                cfg, "max_request_bytes", where, default=None, minimum=1024, maximum=SINGLE_MAX_BYTES
            ),
            timeout=timeout,
        )

    @property
    def api_key(self) -> str:
        """The Data API key (for wiring a sandbox stand-in; never put it in logs)."""
        return self._api_key

    def url(self, endpoint: str) -> str:
        return self._urls[endpoint]

    # An item too large for any request MoEngage takes is the event's fault, not a deploy's:
    # dead-lettered alone, never counted by the bad-deploy guard (worker._map).
    DATA_REJECTIONS = frozenset({"event_too_large"})
    # A user's earlier Track User or Create Event item sent after their deletion would
    # create the user again: a deletion waits for them even when delivery is unordered. So
    # does a merge: the merged user's earlier events sent after it would land on a new
    # profile of that user, not on the retained one (MoEngage merges are not transitive).
    ORDER_BARRIER_KINDS = frozenset({DELETE, MERGE})
    ERASE_KINDS = frozenset({DELETE})
    # MoEngage deletes the merged user and makes a new one of any later call naming it.
    MERGE_FIELDS = MappingProxyType({MERGE: ("merged_user", "retained_user")})
    # MoEngage adds a device to an existing user only: a job's device goes out once its
    # customer item was accepted, or after it in the same Bulk Import. Sent before it, or
    # beside it (unordered delivery sends a batch's requests at once; with `api: single`
    # the two are two requests), a new user's device is accepted and never made.
    FOLLOWERS = MappingProxyType({DEVICE: CUSTOMER})

    def reject_reason(self, item: Item) -> str | None:
        kind = item.output.kind
        if kind not in _OUTPUT_KIND_SET:  # one hash lookup an item, not up to five string compares
            return "unsupported_output_kind"
        # Alone in its request, over the endpoint's cap it would get a 413 every time. A
        # Track User, Create Event or Track Device item too large for Bulk Import goes alone
        # to its own endpoint instead (pack), so only the single endpoints' 128 KB refuses it.
        # len(item.encoded), not item.size: a property is a Python call, and this runs
        # for every mapped item (as does pack's).
        size = len(item.encoded)
        alone = size + _MERGE_ENVELOPE if kind == MERGE else size
        if alone > SINGLE_MAX_BYTES:
            return "event_too_large"
        return None

    def rejection_detail(self, item: Item, reason: str) -> str:
        detail = super().rejection_detail(item, reason)
        if reason != "event_too_large":
            return detail
        # By how much, so an operator sees what to trim before a replay (as Segment's says).
        size = len(item.encoded) + (_MERGE_ENVELOPE if item.output.kind == MERGE else 0)
        return (
            f"{detail}: the mapped {item.output.kind} is {size} bytes alone in its request, and MoEngage"
            f" takes at most {SINGLE_MAX_BYTES} bytes a request (its Data API answers 413 to a larger one)"
        )

    def _endpoint(self, item: Item) -> str:
        kind = item.output.kind
        if kind in OWN_ENDPOINT_KINDS:
            return kind
        if kind in (CUSTOMER, EVENT, DEVICE):
            return BULK if self.api == "bulk" else kind
        raise ValueError(f"{self.name}: cannot send output kind {kind!r} to MoEngage (expected one of {OUTPUT_KINDS})")

    def pack(self, items: Sequence[Item]) -> list[Request]:
        # Consecutive items of a batched endpoint share requests; a change of endpoint starts
        # a new group, so a user's alias (merge) or deletion never overtakes their earlier
        # events, nor falls behind their later ones. The single endpoints (Delete User's among
        # them: one user a request) send each item alone, in place. A device follows its
        # user's customer item (MoEngage adds devices to existing users only): in place, so
        # never in an earlier request, and in the same Bulk Import where the two fit in one.
        # In another request, it goes once the customer's is accepted (FOLLOWERS).
        groups: list[tuple[str, list[Item]]] = []
        # Each kind's endpoint, asked of _endpoint once a call rather than once an item.
        endpoints: dict[str, str] = {}
        if self._one_bulk_import(items):
            # Nearly every lease: the loop below would make one group of them all.
            groups.append((BULK, list(items)))
            items = ()
        for item in items:
            kind = item.output.kind
            endpoint = endpoints.get(kind)
            if endpoint is None:
                endpoint = endpoints[kind] = self._endpoint(item)
            if endpoint == BULK and len(item.encoded) + _BULK_ENVELOPE > BULK_MAX_BYTES:
                # Bulk Import would refuse it (413) even alone: its own endpoint takes up to
                # 128 KB, in its place among the user's other items.
                endpoint = kind
            if endpoint in (BULK, MERGE) and groups and groups[-1][0] == endpoint:
                groups[-1][1].append(item)
            else:
                groups.append((endpoint, [item]))
        requests: list[Request] = []
        for endpoint, group in groups:
            if endpoint == BULK:
                runs = chunk(
                    group,
                    envelope_bytes=_BULK_ENVELOPE,
                    max_bytes=self._bulk_max,
                    max_count=len(group),
                    keep_together=_device_of_its_customer,
                )
            elif endpoint == MERGE:
                runs = chunk(
                    group,
                    envelope_bytes=_MERGE_ENVELOPE,
                    max_bytes=self._merge_max,
                    max_count=MERGE_MAX_PAIRS,
                )
            else:
                runs = [group]
            requests.extend(Request(endpoint, run) for run in runs)
        return requests

    def _one_bulk_import(self, items: Sequence[Item]) -> bool:
        """Whether ``items`` all go to Bulk Import (pack's one group of them, in order),
        asked in C: users, events and devices only, none too large for it."""
        return (
            self.api == "bulk"
            and bool(items)
            and _BULK_KINDS.issuperset(map(_OUTPUT_KIND, items))
            and max(map(len, map(_ENCODED, items))) + _BULK_ENVELOPE <= BULK_MAX_BYTES
        )

    def render(self, request: Request) -> bytes:
        items = request.items
        if request.endpoint == BULK:
            return json_object({"type": _TRANSITION, "elements": json_array(items)})
        if request.endpoint == MERGE:
            return json_object({"merge_data": json_array(items)})
        if len(items) != 1:
            raise ValueError(f"{self.name}: the {request.endpoint!r} endpoint takes one item, got {len(items)}")
        return items[0].encoded

    async def send(self, request: Request) -> Response:
        if request.endpoint not in self._urls:
            return Response(0, error=f"unknown endpoint {request.endpoint!r}", failure="unknown_endpoint")
        try:
            body = self.render(request)
        except (ValueError, TypeError) as exc:
            return Response(0, error=f"render_error: {exc}", failure="render_error")
        response = await self._http.post(self._urls[request.endpoint], body, self._headers)
        if request.endpoint == DELETE and _user_already_absent(response):
            # A deletion's goal is that MoEngage has no such user, and it has none: delivered.
            # Dead-lettered, it would be a deletion an operator replays to the same answer, or
            # purges by hand, for every user deleted twice (Segment retries a request, a user
            # asks again) or never sent to MoEngage at all. Reported as a 2xx so the delivery
            # engine's one policy takes it as delivered; the body keeps MoEngage's answer.
            return Response(
                200, body=f"MoEngage answered {response.status}, the user is already absent: {response.body}"
            )
        if _refuses_account(response):
            return replace(response, refuses_account=True)
        return response

    def rate_cost(self, request: Request) -> RateCost:
        bucket = _ITEM_BUCKETS.get(request.endpoint)
        if bucket is not None:
            return RateCost({bucket: len(request.items)})
        if request.endpoint == EVENT:
            return RateCost({"events": sum(_action_count(item) for item in request.items)})
        users = events = devices = 0
        for item in request.items:
            kind = item.output.kind
            if kind == CUSTOMER:
                users += 1
            elif kind == EVENT:
                events += _action_count(item)
            elif kind == DEVICE:
                devices += 1
        # Bulk Import's documented caps name users and events only: its devices are kept to
        # Track Device's 10,000 a minute, the one cap MoEngage documents for devices.
        buckets = {"bulk_users": users, "bulk_events": events, "devices": devices}
        return RateCost({bucket: n for bucket, n in buckets.items() if n})

    def rate_limits(self) -> Mapping[str, float]:
        return {
            "users": 10_000 / PER_MINUTE,
            "events": 30_000 / PER_MINUTE,
            "bulk_users": 60_000 / PER_MINUTE,
            "bulk_events": 60_000 / PER_MINUTE,
            "merge": 1_000 / PER_MINUTE,
            "delete": 5_000 / PER_MINUTE,
            "devices": 10_000 / PER_MINUTE,
        }

    def rate_limit_scope(self) -> str:
        # MoEngage's limits are a workspace's (30,000 events a minute for it, not for each
        # client of it), and a workspace lives in one data center.
        return f"moengage:{self.data_center}:{self.workspace_id}"

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "workspace_id": self.workspace_id,
            "data_center": self.data_center,
            "base_url": self.base_url,
            "api": self.api,
            "max_request_bytes": {BULK: self._bulk_max, MERGE: self._merge_max},
        }

    async def start(self) -> None:
        await self._http.open()

    async def close(self) -> None:
        await self._http.close()


def _device_of_its_customer(previous: Item, item: Item) -> bool:
    """Whether ``item`` is a device of the user whose customer item ``previous`` is: the two
    share a Bulk Import, so MoEngage has the user when it comes to the device."""
    return (
        item.output.kind == DEVICE
        and previous.output.kind == CUSTOMER
        and previous.output.body.get("customer_id") == item.output.body.get("customer_id")
    )


def _action_count(item: Item) -> int:
    # The documented caps count events, and one Create Event item may carry several.
    actions = item.output.body.get("actions")
    return max(1, len(actions)) if isinstance(actions, list) else 1


# MoEngage's Delete User answer for a customer id it has no user for (400): "User doesn't
# exists with customer id <id>". Only that message: any other 400 (a malformed body, say)
# is a failure and stays a dead letter.
_ABSENT_USER = "user doesn't exist"

# The 400s MoEngage answers about the account, not the events (Merge User's documented 400s:
# "Your account is blacklisted, …" type Blacklisted, "Account Suspended." type Account
# Suspended, and "given app_id is invalid/blocked" type InvalidParams, which the Data API
# overview lists for every endpoint). The other endpoints answer a suspended account with a
# 403, already a pause status. Error types are compared without case or a final full stop,
# as MoEngage writes both ways ("Account Temporarily Suspended."); InvalidParams is read by
# its message, since MoEngage also names bad parameters of the events so.
_ACCOUNT_ERROR_TYPES = frozenset({"blacklisted", "blockedclient", "account suspended", "account temporarily suspended"})
_INVALID_APP_ID = "given app_id is invalid/blocked"


def _error_of(response: Response) -> tuple[str, str]:
    """The (type, message) of MoEngage's error envelope in ``response``, lower case and
    stripped; empty strings for what is absent or not text. Read from the envelope, never
    searched for in the whole body: the body may echo a customer id, which could hold any
    words."""
    try:
        body = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    error = body.get("error")
    fields = error if isinstance(error, dict) else body
    kind, message = fields.get("type"), fields.get("message")
    return (
        kind.strip().lower() if isinstance(kind, str) else "",
        message.strip().lower() if isinstance(message, str) else "",
    )


def _user_already_absent(response: Response) -> bool:
    """Whether ``response`` is Delete User's 400 for a user MoEngage does not have."""
    if response.status != 400:
        return False
    return _error_of(response)[1].startswith(_ABSENT_USER)


def _refuses_account(response: Response) -> bool:
    """Whether ``response`` is a 400 that refuses the account (suspended, blacklisted, an
    app id MoEngage does not serve here) rather than the events it carried."""
    if response.status != 400:
        return False
    kind, message = _error_of(response)
    return kind.rstrip(".").strip() in _ACCOUNT_ERROR_TYPES or message.startswith(_INVALID_APP_ID)
