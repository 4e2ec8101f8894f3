"""End to end: a mobile app's identify, with its push token, registers the device in MoEngage
(Track Device) after the user, so a cloud-mode MoEngage customer can push to it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from segment.analytics import Client

from tests.e2e.harness import WORKSPACE, WRITE_KEY

# As analytics-kotlin and analytics-swift fill context.device and context.os.
ANDROID = {
    "device": {
        "id": "8f3c2a1e-android",
        "type": "android",
        "token": "fcm:APA91bH-token",
        "model": "Pixel 8",
        "manufacturer": "Google",
    },
    "os": {"name": "Android", "version": "14"},
    "app": {"version": "5.2.0", "build": "520"},
}


def single_api(raw: dict[str, Any]) -> None:
    raw["destinations"][0]["api"] = "single"


@pytest.mark.parametrize(
    ("tweak", "paths"),
    [
        (None, [f"/v1/transition/{WORKSPACE}"]),
        (single_api, [f"/v1/customer/{WORKSPACE}", f"/v1/device/{WORKSPACE}"]),
    ],
    ids=["bulk-import", "single-api"],
)
async def test_an_identify_with_a_push_token_registers_the_device_after_the_user(make_bridge, tweak, paths):
    bridge = await make_bridge(tweak)
    client = Client(WRITE_KEY, host=bridge.url, sync_mode=True, max_retries=0)
    # The Segment client is synchronous (requests): off the loop, which serves the bridge.
    await asyncio.to_thread(client.identify, "user-77", {"email": "ann@example.com"}, context=ANDROID)
    moe = bridge.moengage
    await moe.wait_for(lambda: len(moe.devices()) + len(moe.ignored) >= 1)

    assert [(c["customer_id"], c["attributes"]) for c in moe.customers()] == [("user-77", {"email": "ann@example.com"})]
    # The device came after its user (MoEngage adds devices to existing users only): the
    # stand-in made it, rather than ignoring it for a user it did not have yet.
    assert moe.ignored == []
    assert moe.devices() == [
        {
            "type": "device",
            "customer_id": "user-77",
            "device_id": "8f3c2a1e-android",
            "attributes": {
                "platform": "ANDROID",
                "push_id": "fcm:APA91bH-token",
                "model": "Pixel 8",
                "app_version": "5.2.0",
                "os_version": "14",
            },
        }
    ]
    assert [r.path for r in moe.requests] == paths
    if len(paths) == 1:
        assert [e["type"] for e in moe.requests[0].body["elements"]] == ["customer", "device"]


async def test_an_identify_without_a_push_token_registers_no_device(bridge):
    client = Client(WRITE_KEY, host=bridge.url, sync_mode=True, max_retries=0)
    context = {**ANDROID, "device": {"id": "8f3c2a1e-android", "type": "android"}}
    await asyncio.to_thread(client.identify, "user-78", {"plan": "pro"}, context=context)
    moe = bridge.moengage
    await moe.wait_for(lambda: len(moe.customers()) >= 1)
    assert [c["customer_id"] for c in moe.customers()] == ["user-78"]
    assert moe.devices() == [] and moe.ignored == []
    assert [e["type"] for e in moe.requests[0].body["elements"]] == ["customer"]
