"""Shared builders for destination tests."""

from __future__ import annotations

from typing import Any

import orjson

from bridge.destinations.base import Item
from bridge.mapping.api import Output


def make_item(kind: str, body: dict[str, Any], job_id: int = 1) -> Item:
    """An Item sized exactly as the delivery engine sizes it (orjson bytes)."""
    return Item(job_id=job_id, output=Output(kind, body), encoded=orjson.dumps(body))


def customer(customer_id: str, job_id: int = 1, **attributes: Any) -> Item:
    return make_item("customer", {"type": "customer", "customer_id": customer_id, "attributes": attributes}, job_id)


def event(customer_id: str, action: str, job_id: int = 1, **attributes: Any) -> Item:
    body = {"type": "event", "customer_id": customer_id, "actions": [{"action": action, "attributes": attributes}]}
    return make_item("event", body, job_id)


def merge(merged: str, retained: str, job_id: int = 1) -> Item:
    return make_item("merge", {"merged_user": merged, "retained_user": retained}, job_id)


def delete(customer_id: str, job_id: int = 1) -> Item:
    return make_item("delete", {"identity_type": "customer_id", "identity_value": customer_id}, job_id)


def device(customer_id: str, job_id: int = 1, push_id: str = "push-token", **attributes: Any) -> Item:
    body = {
        "type": "device",
        "customer_id": customer_id,
        "device_id": f"device-of-{customer_id}",
        "attributes": {"platform": "ANDROID", "push_id": push_id, **attributes},
    }
    return make_item("device", body, job_id)
