"""The one wait loop (rentalml.services.wait_until), driven by an injected clock: no wall-clock sleeps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rentalml.services import wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        self.sleeps.append(dt)
        self.now += dt


def test_returns_the_first_truthy_value_and_polls_at_the_interval():
    clock, answers = FakeClock(), iter([None, 0, [], {"ready": True}])
    assert wait_until(lambda: next(answers), 5, interval=0.5, clock=clock, sleep=clock.sleep) == {"ready": True}
    assert clock.sleeps == [0.5, 0.5, 0.5]


def test_connection_errors_count_as_not_yet_and_are_named_on_timeout():
    clock = FakeClock()

    def refused():
        raise ConnectionRefusedError("nobody home")

    with pytest.raises(TimeoutError, match=r"the registry not met after 2s .*nobody home"):
        wait_until(refused, 2, interval=1, what="the registry", clock=clock, sleep=clock.sleep)
    assert clock.now == 2


def test_other_errors_are_not_swallowed():
    clock = FakeClock()
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 / 0, 2, clock=clock, sleep=clock.sleep)


def test_a_process_that_exits_fails_at_once_not_at_the_timeout():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    clock = FakeClock()
    with pytest.raises(RuntimeError, match="exited with code 3 while waiting for triton"):
        wait_until(lambda: False, 60, proc=proc, what="triton", clock=clock, sleep=clock.sleep)
    assert clock.now == 0
