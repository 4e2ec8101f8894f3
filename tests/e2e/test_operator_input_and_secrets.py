"""Operators' input and upstreams' echoes: a 4xx for bad admin input on both stores, and
no secret kept in part where a text is cut to a length."""

from __future__ import annotations

import io
from typing import Any

from bridge.cli import main as cli_main
from bridge.observability.logging import configure_logging, register_secret
from bridge.testing.standins import Planned
from tests.e2e.harness import ADMIN_TOKEN, API_KEY, WRITE_KEY, basic, on_postgres, wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = basic(WRITE_KEY)


async def test_an_echoed_api_key_cut_by_the_log_line_limit_is_not_logged_in_part(make_bridge):
    """The upstream echoes our API key in a 400 body; the log keeps the first 300 characters
    and redacts after cutting, so a key straddling the cut is logged in part."""
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    register_secret(API_KEY)
    try:
        bridge = await make_bridge()
        bridge.moengage.plan(Planned(400, "x" * 280 + " key " + API_KEY + " was refused"))
        assert (await bridge.post("/v1/track", {"userId": "user-e1", "event": "E"}, H))[0] == 200

        async def dead() -> bool:
            _, body = await bridge.get("/admin/dlq", ADMIN)
            return len(body["dead_letters"]) == 1

        await wait_until(dead, what="the 400 dead letter")
    finally:
        configure_logging("warning", "console")
    logged = stream.getvalue()
    assert "delivery_attempt_failed" in logged
    assert API_KEY[:9] not in logged, "a prefix of the API key reached the log"


async def test_an_echoed_api_key_cut_by_the_pause_reason_limit_is_not_shown_in_part(make_bridge):
    """The guard's pause reason keeps the first 200 characters of the body and redacts after
    cutting: /admin/status (pause_reason) then shows part of the API key."""

    def tweak(raw):
        raw["destinations"][0]["guard"] = {"window": 20, "min_events": 2, "threshold": 0.5}

    bridge = await make_bridge(tweak)
    bridge.moengage.refuse_all(401)
    bridge.moengage.plan(*[Planned(401, "x" * 185 + " key " + API_KEY) for _ in range(20)])
    batch = {"batch": [{"type": "track", "userId": f"user-g{i}", "event": "E"} for i in range(3)]}
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200

    async def paused() -> bool:
        _, body = await bridge.get("/admin/status", ADMIN)
        return bool(next(d for d in body["destinations"] if d["name"] == "moengage-main")["paused"])

    await wait_until(paused, what="the guard to pause moengage-main")
    _, body = await bridge.get("/admin/status", ADMIN)
    reason = next(d for d in body["destinations"] if d["name"] == "moengage-main")["pause_reason"]
    assert "refused" in reason, reason
    assert API_KEY[:9] not in reason, f"a prefix of the API key is in the pause reason: {reason!r}"


async def _two_dead_letters(bridge) -> list[int]:
    bridge.moengage.refuse_all(400)
    for i in range(2):
        assert (await bridge.post("/v1/track", {"userId": f"user-d{i}", "event": f"E{i}"}, H))[0] == 200

    async def dead() -> bool:
        _, body = await bridge.get("/admin/dlq", ADMIN)
        return len(body["dead_letters"]) == 2

    await wait_until(dead, what="two dead letters")
    _, body = await bridge.get("/admin/dlq", ADMIN)
    return [d["id"] for d in body["dead_letters"]]


async def test_a_purge_filter_of_an_empty_since_does_not_purge_every_dead_letter(bridge):
    """README: purge takes "a non-empty JSON filter"; {} is refused (filter_required) so that a
    filter of nothing never selects everything. {"since": ""} passes that check (the value is
    not None), then _time("") reads as no bound at all: every dead letter is purged."""
    await _two_dead_letters(bridge)
    for empty in ({"since": ""}, {"until": ""}):
        status, body = await bridge.post("/admin/dlq/purge", empty, ADMIN)
        _, listed = await bridge.get("/admin/dlq", ADMIN)
        assert len(listed["dead_letters"]) == 2, f"{empty} purged {body}"
        assert status == 400, (status, body)


async def test_a_purge_until_nan_on_postgres_does_not_purge_every_dead_letter(make_bridge, pg_schema):
    """until "nan" is read as float('nan'): on PostgreSQL NaN sorts above every number, so
    `failed_at < 'NaN'` holds for every row and the purge empties the DLQ."""
    bridge = await on_postgres(make_bridge, pg_schema)
    try:
        await _two_dead_letters(bridge)
        status, body = await bridge.post("/admin/dlq/purge", {"until": "nan"}, ADMIN)
        _, listed = await bridge.get("/admin/dlq", ADMIN)
        assert len(listed["dead_letters"]) == 2, f'{{"until": "nan"}} purged {body}'
        assert status == 400, (status, body)
    finally:
        await bridge.stop()


async def test_a_nul_in_an_admin_filter_or_translate_is_not_a_500on_postgres(make_bridge, pg_schema):
    """httpx: "a 5xx is only ever the bridge's own fault ... never an answer to bad input".
    PostgreSQL text cannot hold U+0000; the store cleans it on every write, but not in the
    operators' filters nor in the ids translate resolves: a 500 (CharacterNotInRepertoireError)."""
    bridge = await on_postgres(make_bridge, pg_schema)
    try:
        answers = [
            await bridge.get("/admin/dlq?destination=%00", ADMIN),
            await bridge.get("/admin/discards?reason=a%00b", ADMIN),
            await bridge.post("/admin/dlq/purge", {"destination": "\u0000"}, ADMIN),
            await bridge.post("/admin/dlq/replay", {"reason": "\u0000"}, ADMIN),
            await bridge.post(
                "/admin/translate?destination=moengage-main",
                {"type": "track", "userId": "a\u0000b", "event": "E"},
                ADMIN,
            ),
        ]
    finally:
        await bridge.stop()
    assert [status for status, _ in answers] == [200] * 5, answers


async def test_an_accepted_event_whose_user_id_holds_a_nul_is_deliveredon_postgres(make_bridge, pg_schema):
    """Ingest takes a userId with U+0000 (200), but the worker's identity-link lookup sends
    it to PostgreSQL as is: every attempt fails (delivery_failed), the job is never
    delivered nor dead-lettered. README: "Delivered or dead-lettered, never dropped"."""
    bridge = await on_postgres(make_bridge, pg_schema)
    try:
        assert (await bridge.post("/v1/track", {"userId": "user-\u0000-nul", "event": "With NUL"}, H))[0] == 200
        await wait_until(lambda: len(bridge.moengage.events()) == 1, timeout=5, what="the event's delivery")
    finally:
        await bridge.stop()


def test_a_store_password_with_a_hash_or_question_mark_is_not_printed(tmp_path, capsys):
    """README: every configured secret, "the store URL password" included, never appears.
    docs/operations.md forbids only @ / : % in the password. With '#' or '?' in it, urlsplit
    ends the netloc early, so the password is never registered, and asyncpg's parse error
    quotes part of it: "store error: cannot connect to PostgreSQL: invalid literal for int()
    with base 10: 'Sup3rS3cret'"."""
    for password, fragment in (("Sup3rS3cret#Pw9", "Sup3rS3cret"), ("Sup3rS3cret?Pw9", "Pw9@")):
        path = tmp_path / "bridge.yaml"
        path.write_text(f'store: {{url: "postgresql://bridge:{password}@127.0.0.1:1/bridge"}}\n')
        code = cli_main(["dlq", "list", "--config", str(path)])
        err = capsys.readouterr().err
        assert code != 0
        assert fragment not in err, f"part of the store password was printed: {err!r}"


async def the_one_dead_letter(bridge: Any) -> dict[str, Any]:
    """The destination's only dead letter, once there is one, as /admin/dlq/{id} shows it."""

    async def dead() -> bool:
        _, body = await bridge.get("/admin/dlq", ADMIN)
        return len(body["dead_letters"]) == 1

    await wait_until(dead, what="the 400 dead letter")
    _, listed = await bridge.get("/admin/dlq", ADMIN)
    _, letter = await bridge.get(f"/admin/dlq/{listed['dead_letters'][0]['id']}", ADMIN)
    return dict(letter)


async def test_an_echoed_api_key_across_the_kept_body_limit_is_not_kept_in_part(bridge):
    """Only the first 4 KB of an upstream's refusal are kept for the dead letter. A key
    echoed across that cut was cut before it could be recognised, and kept in part."""
    bridge.moengage.plan(Planned(400, "x" * 4090 + " " + API_KEY + " refused"))
    assert (await bridge.post("/v1/track", {"userId": "user-cut", "event": "E"}, H))[0] == 200
    kept = (await the_one_dead_letter(bridge))["response_body"]
    assert kept.startswith("x" * 100) and len(kept) <= 4096, len(kept)
    assert API_KEY[:5] not in kept, kept[-40:]


async def test_an_echoed_api_key_at_the_read_limit_is_not_kept_in_part_after_a_long_token_shrinks(bridge):
    """The refusal is read to 4 KB + a 1 KB margin, redacted, then cut to 4 KB: a key cut off
    by the read limit is not recognised, but was thought to lie past the 4 KB kept. A long
    credential before it (a Bearer token here) shrinks to its fingerprint when redacted and
    pulls the cut-off key back inside the kept 4 KB."""
    head = f"refused: {'why ' * 30}Bearer "
    token = "T" * (4096 + 1024 - 10 - len(head) - 1)  # the key starts 10 bytes before the read ends
    bridge.moengage.plan(Planned(400, f"{head}{token} {API_KEY} refused"))
    assert (await bridge.post("/v1/track", {"userId": "user-shrink", "event": "E"}, H))[0] == 200
    kept = (await the_one_dead_letter(bridge))["response_body"]
    assert kept.startswith("refused: why why"), kept[:40]
    assert API_KEY[:5] not in kept, f"a prefix of the API key was kept: {kept!r}"
