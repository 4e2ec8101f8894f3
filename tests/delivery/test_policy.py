import random
import time

import pytest

from bridge.config.model import GuardConfig, RetryConfig
from bridge.delivery.guard import DeadLetterGuard
from bridge.delivery.policy import Action, RetryPolicy, RetrySchedule
from bridge.delivery.ratelimit import TokenBucket
from bridge.destinations.base import Response


@pytest.mark.parametrize(
    ("status", "items", "action"),
    [
        (200, 5, Action.DELIVERED),
        (204, 1, Action.DELIVERED),
        (0, 3, Action.RETRY),
        (408, 1, Action.RETRY),
        (429, 1, Action.RETRY),
        (500, 1, Action.RETRY),
        (503, 1, Action.RETRY),
        (501, 1, Action.DEAD),
        (505, 1, Action.DEAD),
        (413, 2, Action.SPLIT),
        (413, 1, Action.DEAD),
        (400, 4, Action.BISECT),
        (400, 1, Action.DEAD),
        (401, 4, Action.PAUSE),
        (401, 1, Action.PAUSE),
        (403, 1, Action.PAUSE),
        (409, 2, Action.PAUSE),
        (415, 1, Action.PAUSE),
        (404, 4, Action.DEAD),
        (422, 1, Action.DEAD),
        # A redirect is about the destination's URL, never the events: hold them all.
        (301, 4, Action.PAUSE),
        (302, 1, Action.PAUSE),
        (307, 2, Action.PAUSE),
        (308, 1, Action.PAUSE),
    ],
)
def test_classification(status, items, action):
    assert RetryPolicy(RetryConfig()).classify(Response(status), items) is action


def test_retryable_statuses_are_configurable():
    policy = RetryPolicy(RetryConfig(retryable_statuses=frozenset({503})))
    assert policy.classify(Response(500), 1) is Action.DEAD
    assert policy.classify(Response(503), 1) is Action.RETRY
    assert policy.classify(Response(0, error="timeout"), 1) is Action.RETRY


def test_pause_statuses_are_configurable():
    policy = RetryPolicy(RetryConfig(pause_statuses=frozenset({404})))
    assert policy.classify(Response(404), 3) is Action.PAUSE
    assert policy.classify(Response(401), 1) is Action.DEAD
    # A retryable status is retried, whatever else lists it.
    assert RetryPolicy(RetryConfig(pause_statuses=frozenset({503}))).classify(Response(503), 1) is Action.RETRY


@pytest.mark.parametrize("items", [1, 4])
def test_an_answer_refusing_the_account_pauses_whatever_its_status(items):
    # MoEngage's Merge User answers a suspended account with a 400: bisected and dead-lettered,
    # every alias sent while it lasts would end in the DLQ.
    policy = RetryPolicy(RetryConfig())
    assert policy.classify(Response(400, refuses_account=True), items) is Action.PAUSE
    # A retryable answer is still retried.
    assert policy.classify(Response(503, refuses_account=True), items) is Action.RETRY


def test_backoff_is_full_jitter_under_an_exponential_cap():
    policy = RetryPolicy(RetryConfig(base_delay=1, max_delay=300))
    rng = random.Random(7)
    for attempts in range(1, 15):
        cap = min(300, 2 ** (attempts - 1))
        samples = [policy.delay(attempts, None, rng) for _ in range(200)]
        assert all(0 <= s <= cap for s in samples)
        assert max(samples) > cap * 0.8  # jitter spans the range


def test_retry_after_is_a_floor_and_is_clamped():
    policy = RetryPolicy(RetryConfig(base_delay=1, max_delay=300, max_retry_after=600))
    assert policy.delay(1, 30.0) >= 30.0
    assert policy.delay(1, 86400.0) <= 600.0
    assert policy.delay(1, -5.0) <= 1.0


def test_budget_needs_both_time_and_attempts():
    policy = RetryPolicy(RetryConfig(max_age=3600, min_attempts=3))
    assert not policy.exhausted(10, first_attempt_at=0, now=3599)
    assert not policy.exhausted(2, first_attempt_at=0, now=10_000)
    assert policy.exhausted(3, first_attempt_at=0, now=3600)


def test_guard_trips_on_ratio_over_window():
    guard = DeadLetterGuard(GuardConfig(window=10, min_events=5, threshold=0.5))
    guard.record(delivered=3, dead=1)
    assert not guard.tripped()  # only 4 outcomes
    guard.record(delivered=0, dead=3)
    assert guard.ratio == pytest.approx(4 / 7)
    assert guard.tripped()
    guard.record(delivered=10, dead=0)  # the window slides
    assert guard.ratio == 0 and not guard.tripped()


def test_guard_counts_runs_of_outcomes_as_one_at_a_time():
    # record() takes each run of outcomes at once; the window and its dead count must be
    # what appending the outcomes one by one, oldest dropped first, gives.
    rng = random.Random(7)
    for window in (1, 3, 10):
        guard = DeadLetterGuard(GuardConfig(window=window, min_events=1, threshold=0.5))
        model: list[bool] = []
        for _ in range(300):
            delivered, dead = rng.choice((0, 0, 1, 2, 5, 25)), rng.choice((0, 0, 1, 2, 5, 25))
            guard.record(delivered, dead)
            model = (model + [False] * delivered + [True] * dead)[-window:]
            assert list(guard._window) == model
            assert guard.ratio == pytest.approx(sum(model) / len(model) if model else 0.0)


def test_guard_would_trip_answers_before_dead_lettering():
    guard = DeadLetterGuard(GuardConfig(window=10, min_events=5, threshold=0.5))
    assert not guard.would_trip(4)  # too few outcomes to judge
    assert guard.would_trip(5) and guard.would_trip(500)  # a whole bad batch
    guard.record(delivered=10, dead=0)
    assert not guard.would_trip(1)  # one poison event among good deliveries
    assert not guard.would_trip(5)  # 5 of the last 10: not over half
    assert guard.would_trip(6)
    assert not guard.tripped()  # asking records nothing
    assert not DeadLetterGuard(GuardConfig(enabled=False, window=10, min_events=1)).would_trip(100)


def test_token_bucket_debt_and_adaptive_slowdown():
    bucket = TokenBucket(rate=10, burst=10)
    assert bucket.reserve(10) == 0
    wait = bucket.reserve(5)
    assert 0.4 <= wait <= 0.55  # 5 tokens of debt at 10/s
    bucket.throttled()
    assert bucket.rate == 5
    for _ in range(20):
        bucket.throttled()
    assert bucket.rate == pytest.approx(0.5)  # floor: 5% of the configured rate


def test_token_bucket_halves_once_for_429s_of_requests_sent_before_the_halving():
    bucket = TokenBucket(rate=10, burst=10)
    sent = time.monotonic()  # several requests take their tokens together ...
    for _ in range(20):
        bucket.throttled(sent_at=sent)  # ... and all get a 429: one signal
    assert bucket.rate == 5
    bucket.throttled(sent_at=time.monotonic())  # sent at the halved rate, refused again
    assert bucket.rate == 2.5


def test_backoff_survives_very_many_attempts():
    policy = RetryPolicy(RetryConfig(base_delay=1, max_delay=300))
    assert 0 <= policy.delay(5000, None) <= 300  # 2**4999 would overflow a float


def test_a_failed_batch_is_rescheduled_together():
    """500 jobs refused by one 500: one jittered due time per attempt count, not 500."""
    schedule = RetrySchedule(RetryPolicy(RetryConfig(base_delay=1, max_delay=300)), now=1000.0)
    for job_id in range(500):
        schedule.add(job_id, attempts=1 + job_id % 2, retry_after=None)
    # One due time per attempt count: two, or one when the two jittered delays happen to
    # round to the same millisecond (about one run in a thousand).
    assert len(schedule.groups) in (1, 2) and sum(map(len, schedule.groups.values())) == 500
    schedule.add(999, attempts=1, retry_after=30.0)  # told when: its own due time, at least 30 s out
    [late] = [at for at, ids in schedule.groups.items() if 999 in ids]
    assert late >= 1030 and schedule.groups[late] == [999]


def test_a_request_that_could_not_be_built_is_bisected_then_dead_not_retried():
    policy = RetryPolicy(RetryConfig())
    broken = Response(0, error="render_error: bad item", failure="render_error")
    assert policy.classify(broken, 8) is Action.BISECT  # find the items at fault
    assert policy.classify(broken, 1) is Action.DEAD
    assert policy.classify(Response(0, error="timeout"), 1) is Action.RETRY  # unlike a network failure
