"""The moving window behind the per-key quotas, on a clock the test moves."""

from __future__ import annotations

from app.jobs.quotas import MovingWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hits_count_until_they_leave_the_window():
    clock = Clock()
    window = MovingWindow(60, clock)
    assert all(window.hit("k", limit=3) for _ in range(3))
    assert not window.hit("k", limit=3)  # full: refused and not counted
    assert window.used("k") == 3
    assert window.reset_in("k") == 60
    clock.now += 59.9
    assert not window.hit("k", limit=3)
    assert round(window.reset_in("k"), 6) == 0.1
    clock.now += 0.1  # the first three leave together
    assert window.used("k") == 0 and window.reset_in("k") == 0
    assert window.hit("k", limit=3)


def test_it_is_a_moving_window_not_a_fixed_one():
    clock = Clock()
    window = MovingWindow(10, clock)
    window.add("k", 5)
    clock.now += 6
    window.add("k", 4)
    assert window.used("k") == 9
    assert not window.hit("k", limit=10, cost=2)
    clock.now += 4  # the first hit leaves; the second stays for 6 s more
    assert window.used("k") == 4
    assert window.reset_in("k") == 6
    assert window.hit("k", limit=10, cost=6)
    assert window.used("k") == 10


def test_costs_and_keys_are_separate():
    clock = Clock()
    window = MovingWindow(60, clock)
    assert window.hit("a", limit=100, cost=60)
    assert not window.hit("a", limit=100, cost=41)
    assert window.hit("b", limit=100, cost=100)
    assert window.used("a") == 60 and window.used("b") == 100


def test_idle_keys_are_dropped():
    clock = Clock()
    window = MovingWindow(1, clock)
    for i in range(1000):
        window.add(f"key-{i}")
    clock.now += 2
    for i in range(1000):
        assert window.used(f"key-{i}") == 0
    assert window._hits == {} and window._used == {}
