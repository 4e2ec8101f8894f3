"""What each destination accepts, per output kind: checked in the YAML at load and on
every produced body, so a bad mapping fails at ``bridge mappings check``, not at send."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.mapping.yamlnodes import Diagnostics, YNode, did_you_mean, join
from bridge.sources.segment.spec import MAX_MESSAGE_ID


@dataclass(frozen=True, slots=True)
class Shape:
    fields: tuple[str, ...]
    required: tuple[str, ...] = ()
    one_of: tuple[str, ...] = ()  # at least one of these must be set
    typed: bool = True  # the engine sets body["type"] = kind
    action_fields: tuple[str, ...] = ()  # for MoEngage events: keys of each actions[] item
    required_attributes: tuple[str, ...] = ()  # for MoEngage devices: keys `attributes` must set
    # Fields that must be JSON objects when set: Segment answers 200 to an event whose
    # properties or traits is not one and drops it (properties_not_object, traits_not_object).
    objects: tuple[str, ...] = ()


_ACTION_FIELDS = (
    "action",
    "attributes",
    "platform",
    "app_version",
    "current_time",
    "user_time",
    "user_timezone_offset",
)
# Segment's limit on a messageId (reference/segment-api.md): the sources refuse a longer
# one inbound, and a mapping's own template must not produce one outbound.
MAX_SEGMENT_MESSAGE_ID = MAX_MESSAGE_ID
_SEGMENT_COMMON = ("userId", "anonymousId", "messageId", "timestamp", "originalTimestamp", "context", "integrations")

SHAPES: dict[str, dict[str, Shape]] = {
    "moengage": {
        "customer": Shape(("customer_id", "attributes", "update_existing_only"), required=("customer_id",)),
        "event": Shape(
            ("customer_id", "device_id", "actions", "update_existing_only"),
            required=("customer_id", "actions"),
            action_fields=_ACTION_FIELDS,
        ),
        "merge": Shape(("merged_user", "retained_user"), required=("merged_user", "retained_user"), typed=False),
        # Track Device: MoEngage requires the device's platform and push_id (its push token).
        "device": Shape(
            ("customer_id", "device_id", "attributes"),
            required=("customer_id", "attributes"),
            required_attributes=("platform", "push_id"),
        ),
        # Delete User: one user a request, named as MoEngage's body names it (no `type`).
        "delete": Shape(("identity_type", "identity_value"), required=("identity_type", "identity_value"), typed=False),
    },
    "segment": {
        "track": Shape(
            ("event", "properties", *_SEGMENT_COMMON),
            required=("event",),
            one_of=("userId", "anonymousId"),
            objects=("properties",),
        ),
        "identify": Shape(("traits", *_SEGMENT_COMMON), one_of=("userId", "anonymousId"), objects=("traits",)),
    },
}


def check_body_node(
    diags: Diagnostics, destination: str, kind: str, body: YNode, ypath: str, override_keys: set[str]
) -> None:
    """Static checks of a rule's ``body`` against the destination's shape."""
    shape = SHAPES[destination][kind]
    if not body.is_map:
        diags.add(body, ypath, "expected a mapping of output field to value")
        return
    for key in body.value:
        if key == "type" and shape.typed:
            diags.add_at(
                body.key_pos[key], join(ypath, key), f"'type' is set from the rule's kind ({kind!r}); remove it"
            )
        elif key not in shape.fields:
            diags.add_at(
                body.key_pos[key],
                join(ypath, key),
                f"{destination} {kind!r} has no field {key!r}{did_you_mean(key, shape.fields)}; "
                f"expected one of: {', '.join(shape.fields)}",
            )
    for key in shape.required:
        if key not in body.value and key not in override_keys:
            diags.add(body, ypath, f"a {destination} {kind!r} rule must set {key!r}")
    if shape.one_of and not any(k in body.value for k in shape.one_of):
        diags.add(body, ypath, f"a {destination} {kind!r} rule must set {' or '.join(shape.one_of)}")
    if shape.action_fields and "actions" in body.value:
        _check_actions(diags, body.value["actions"], join(ypath, "actions"), shape.action_fields)
    if shape.required_attributes and "attributes" in body.value:
        _check_attributes(diags, body.value["attributes"], join(ypath, "attributes"), destination, kind, shape)


def _check_attributes(diags: Diagnostics, node: YNode, ypath: str, destination: str, kind: str, shape: Shape) -> None:
    """An ``object:`` of attributes must name each required attribute; any other value (a
    path, ``rest``) can only be checked on the body it produces, at run time."""
    obj = node.value.get("object") if node.is_map else None
    if obj is None or not obj.is_map or "rest" in node.value:
        return
    for key in shape.required_attributes:
        if key not in obj.value:
            diags.add(obj, join(ypath, "object"), f"a {destination} {kind!r} rule's attributes must set {key!r}")


def _check_actions(diags: Diagnostics, node: YNode, ypath: str, allowed: tuple[str, ...]) -> None:
    if not node.is_list or not node.value:
        diags.add(node, ypath, "expected a list of actions, each 'object: {action: ..., attributes: ...}'")
        return
    for i, item in enumerate(node.value):
        ip = join(ypath, i)
        obj = item.value.get("object") if item.is_map else None
        if obj is None or not obj.is_map:
            diags.add(item, ip, "each action must be 'object: {action: ..., ...}' so its fields can be checked")
            continue
        op = join(ip, "object")
        for key in obj.value:
            if key not in allowed:
                diags.add_at(
                    obj.key_pos[key],
                    join(op, key),
                    f"a MoEngage action has no field {key!r}{did_you_mean(key, allowed)}; "
                    f"expected one of: {', '.join(allowed)}",
                )
        if "action" not in obj.value:
            diags.add(obj, op, "a MoEngage event action must set 'action'")


def body_checker(destination: str, kind: str) -> Callable[[dict[str, Any]], str | None]:
    """A run-time check of produced bodies; the MoEngage event path is the hot one."""
    if destination == "moengage" and kind == "event":

        def check_event(body: dict[str, Any]) -> str | None:
            cid = body.get("customer_id")
            actions = body.get("actions")
            # isspace(): MoEngage trims, so an id or a name of whitespace alone is empty to it
            if type(cid) is str and cid and not cid.isspace() and type(actions) is list and actions:
                for a in actions:
                    if type(a) is not dict or type(name := a.get("action")) is not str or not name or name.isspace():
                        break
                else:
                    if "device_id" not in body or type(body["device_id"]) is str:
                        return None
            return check_body(destination, kind, body)

        return check_event
    return lambda body: check_body(destination, kind, body)


# Ids, each a string wherever a body has it: a number or an object would name no user.
_STRING_FIELDS = (
    "customer_id",
    "device_id",
    "merged_user",
    "retained_user",
    "identity_type",
    "identity_value",
    "event",
    "userId",
    "anonymousId",
)


def check_body(destination: str, kind: str, body: dict[str, Any]) -> str | None:
    """Run-time check of a produced body; returns what is wrong, or None."""
    shape = SHAPES[destination][kind]
    # MoEngage trims what it reads: an id or a name of whitespace alone is one it refuses
    # (a 400 alone; dropped unseen from a Bulk Import it answers 200), so it is empty here.
    blank = is_blank_to_moengage if destination == "moengage" else is_blank
    for key in shape.required:
        if blank(body.get(key)) and key != "actions":
            if body.get(key):
                return f"{key!r} is only whitespace, which MoEngage reads as empty"
            return f"{key!r} is missing or empty"
    if shape.one_of:
        if all(is_blank(body.get(k)) for k in shape.one_of):
            return f"none of {', '.join(shape.one_of)} is set"
        for key in shape.one_of:
            # Segment drops an event with an empty id even beside a good one (id_not_string),
            # answering 200: such an event would be lost without a trace.
            if body.get(key) == "":
                return f"{key!r} is empty (leave it out instead: drop_if: empty)"
    for key in shape.objects:
        if key in body and type(body[key]) is not dict:
            return f"{key!r} must be an object, got {type(body[key]).__name__}"
    if (
        destination == "moengage"
        and (attributes := body.get("attributes")) is not None
        and type(attributes) is not dict
    ):
        # MoEngage refuses a user or device whose attributes are not an object (a 400 alone,
        # the element dropped unseen from a Bulk Import it answers 200).
        return f"'attributes' must be an object, got {type(attributes).__name__}"
    for key in _STRING_FIELDS:
        if key in body and not isinstance(value := body[key], str):
            if value is None and key in shape.one_of:
                # A null id beside a set one: what Segment's own libraries send for a user
                # not yet identified (userId: null), and Segment takes it as absent.
                continue
            return f"{key!r} must be a string, got {type(value).__name__}"
    message_id = body.get("messageId")
    if destination == "segment" and message_id is not None:
        if type(message_id) is not str:
            return f"'messageId' must be a string, got {type(message_id).__name__}"
        if len(message_id) > MAX_SEGMENT_MESSAGE_ID:
            # Segment documents at most 100 characters: past that the event would be
            # refused or cut after the bridge counted it delivered. Dead-lettered instead.
            return f"'messageId' is {len(message_id)} characters; Segment takes at most {MAX_SEGMENT_MESSAGE_ID}"
    if shape.required_attributes:
        attributes = body.get("attributes")
        if type(attributes) is not dict:
            return "'attributes' must be an object"
        for key in shape.required_attributes:
            value = attributes.get(key)
            if type(value) is not str or blank(value):
                return f"attributes.{key} is missing or not a string"
    if shape.action_fields:
        actions = body.get("actions")
        if not isinstance(actions, list) or not actions:
            return "'actions' is missing or empty"
        for i, a in enumerate(actions):
            if not isinstance(a, dict) or not isinstance(a.get("action"), str) or blank(a["action"]):
                return f"actions[{i}].action is missing or not a string"
    return None


def is_blank(v: Any) -> bool:
    return v is None or v == ""


def is_blank_to_moengage(v: Any) -> bool:
    return v is None or (type(v) is str and (not v or v.isspace()))
