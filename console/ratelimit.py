"""Rate limiting of failed sign-ins, per user name and client address.

The failures are rows in the store (``saga_login_failures``), so every
console process counts the same ones: with gunicorn's workers, or consoles on
several hosts behind one address, the limit is the limit. A row older than
the window is deleted as new failures come in, so a flood of made-up names
cannot grow the table beyond one window's worth.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from console.services import UserStore


class LoginThrottle:
    """At most ``max_failures`` failed sign-ins per key in any ``window`` seconds."""

    def __init__(
        self,
        users: UserStore,
        max_failures: int,
        window: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.users = users
        self.max_failures = max_failures
        self.window = window
        # Wall-clock seconds: the processes that share the counts share no other clock.
        self.clock = clock

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 when it may try now."""
        now = self._now_ms()
        times = self.users.recent_login_failures(
            key, now - self._window_ms() + 1, self.max_failures
        )
        if len(times) < self.max_failures:
            return 0.0
        oldest_counted = min(times)
        return max(oldest_counted + self._window_ms() - now, 0) / 1000

    def failed(self, key: str) -> None:
        now = self._now_ms()
        self.users.record_login_failure(key, now, forget_before=now - self._window_ms())

    def succeeded(self, key: str) -> None:
        self.users.clear_login_failures(key)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _window_ms(self) -> int:
        return int(self.window * 1000)
