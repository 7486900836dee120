"""Rate limiting of failed sign-ins, per user name and client address.

The counts live in this process's memory: they reset when the console
restarts, and each console process (a gunicorn worker) counts on its own,
so with N workers an attacker gets up to N times the limit. That still
turns a password-guessing run from millions of tries into a handful per
window; put a reverse proxy limit in front for more.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

#: Keys remembered at most, so a flood of made-up names cannot fill memory.
MAX_KEYS = 10_000


class LoginThrottle:
    """At most ``max_failures`` failed sign-ins per key in any ``window`` seconds."""

    def __init__(
        self, max_failures: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 when it may try now."""
        with self._lock:
            times = self._recent(key)
            if len(times) < self.max_failures:
                return 0.0
            return max(times[0] + self.window - self.clock(), 0.0)

    def failed(self, key: str) -> None:
        with self._lock:
            self._recent(key).append(self.clock())
            self._failures.move_to_end(key)
            while len(self._failures) > MAX_KEYS:
                self._failures.popitem(last=False)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def _recent(self, key: str) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        cutoff = self.clock() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        return times
