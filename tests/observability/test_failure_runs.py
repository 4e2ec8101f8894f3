"""A periodic task's run of failures: one traceback, a line a minute, one recovery line."""

from __future__ import annotations

from structlog.testing import capture_logs

from bridge.observability.failure_runs import FailureRun


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_run_of_failures_is_one_traceback_then_a_line_a_minute_then_one_recovery() -> None:
    clock = Clock()
    run = FailureRun("lease_failed", "lease_recovered", every=60.0, clock=clock, destination="moengage-main")
    with capture_logs() as logs:
        for n in range(200):  # a poll every 0.5 s for 100 s
            run.failed(ConnectionRefusedError(111, f"connection refused, try {n}"))
            clock.now += 0.5
        run.succeeded()
        run.succeeded()  # nothing failed since: nothing more to say
    assert [entry["event"] for entry in logs] == ["lease_failed", "lease_failed", "lease_recovered"]
    first, repeat, recovered = logs
    assert isinstance(first["exc_info"], ConnectionRefusedError)  # the traceback, once
    assert first["destination"] == "moengage-main" and first["log_level"] == "error"
    # A minute in: how many, for how long, and the latest error, with no traceback.
    assert "exc_info" not in repeat
    assert (repeat["failures"], repeat["failing_seconds"]) == (121, 60.0)
    assert repeat["error"] == "ConnectionRefusedError: [Errno 111] connection refused, try 120"
    assert (recovered["failures"], recovered["failing_seconds"], recovered["log_level"]) == (200, 100.0, "info")


def test_a_new_run_after_a_recovery_logs_its_traceback_again() -> None:
    clock = Clock()
    run = FailureRun("queue_gauges_failed", "queue_gauges_recovered", clock=clock)
    with capture_logs() as logs:
        run.failed(TimeoutError())
        run.succeeded()
        clock.now += 1
        run.failed(OSError("the disk went away"))
    assert [(e["event"], "exc_info" in e) for e in logs] == [
        ("queue_gauges_failed", True),
        ("queue_gauges_recovered", False),
        ("queue_gauges_failed", True),
    ]


def test_the_wait_doubles_with_each_failure_up_to_its_cap_and_is_the_poll_once_it_works() -> None:
    run = FailureRun("lease_failed", "lease_recovered", clock=Clock())
    assert run.backoff(0.05, 5.0) == 0.05
    waits = []
    with capture_logs():
        for _ in range(10):
            run.failed(OSError("down"))
            waits.append(run.backoff(0.05, 5.0))
        assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
        # A poll longer than the cap is never shortened.
        assert run.backoff(30.0, 5.0) == 30.0
        run.succeeded()
    assert run.backoff(0.05, 5.0) == 0.05
