"""Digests of delivered outputs: what tells a later attempt which outputs to leave out."""

from __future__ import annotations

from bridge.delivery.outputs import DIGEST_BYTES, digests_of, not_yet_delivered, output_digest, split_digests
from tests.destinations.helpers import customer, event, make_item


def test_a_digest_is_of_the_kind_and_the_body_as_sent() -> None:
    one = customer("u1", plan="pro")
    assert len(output_digest(one)) == DIGEST_BYTES
    assert output_digest(one) == output_digest(customer("u1", job_id=9, plan="pro"))  # not of the job
    assert output_digest(one) != output_digest(customer("u1", plan="free"))
    assert output_digest(one) != output_digest(make_item("event", one.output.body))  # another endpoint


def test_only_the_outputs_delivered_before_are_left_out_in_order() -> None:
    user, bought, viewed = customer("u1"), event("u1", "Bought"), event("u1", "Viewed")
    assert not_yet_delivered([user, bought, viewed], digests_of([bought])) == [user, viewed]
    assert not_yet_delivered([user, bought], b"") == [user, bought]
    assert not_yet_delivered([user], digests_of([user, bought])) == []


def test_an_output_a_changed_mapping_makes_differently_is_sent() -> None:
    before = customer("u1", plan="pro")
    assert not_yet_delivered([customer("u1", plan="team")], digests_of([before])) != []


def test_the_same_output_twice_is_sent_once_per_copy_not_delivered() -> None:
    twice = [event("u1", "Bought"), event("u1", "Bought")]
    assert not_yet_delivered(twice, digests_of(twice[:1])) == twice[1:]
    assert not_yet_delivered(twice, digests_of(twice)) == []
    assert split_digests(digests_of(twice)) == [output_digest(twice[0])] * 2
