"""Wait for a condition on a live system (tests, the demo, chaos and benchmark runs)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until[T](
    condition: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.05
) -> T:
    """Poll `condition` until it returns something truthy; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
