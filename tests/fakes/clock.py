"""A clock the test moves by hand (for code that takes an injected ``clock: Callable[[], float]``)."""

from __future__ import annotations


class FakeClock:
    """Monotonic seconds that only change when :meth:`advance` is called."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds
        return self.now
