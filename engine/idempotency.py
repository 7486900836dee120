"""The idempotency guard participants put around their effects.

A step may run more than once (a worker died after the participant acted
but before the engine stored the result). The guard keeps one row per key:
the first call inserts it, runs the effect and stores its result in the
same transaction; any later call with that key finds the row, counts a
duplicate, and returns the stored result without running the effect.

Because the key row and the effect commit together, the effect happens once
when it writes to the same database as the guard. For effects elsewhere (an
HTTP call), pass the key on so the remote side can deduplicate too.

Late actions are fenced. An action whose attempt timed out may still arrive
(a slow thread, a command read late) after the saga compensated its step and
the compensation found nothing to undo. So when a compensation runs under the
engine's key ``<saga>:<step>:compensate``, the guard first writes the action's
key ``<saga>:<step>:action`` as a fence, unless the action already ran; an
action arriving later under that key raises
:class:`~engine.errors.ActionFenced` (a non-retryable failure) and does
nothing. The engine notes it on the saga's timeline like any late outcome.

The ``saga_duplicates_absorbed`` metric moves once the duplicate's
transaction committed: the guard's own (:meth:`IdempotencyGuard.run_once`), or
the store's (a transactional step). In a transaction of the caller's own, the
guard cannot see the commit and counts at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from engine import metrics
from engine.errors import ActionFenced
from engine.model import action_key_of
from engine.store.commits import after_commit
from engine.store.connection import Connection, Database
from engine.store.keys import IdempotencyKeys

T = TypeVar("T")


class IdempotencyGuard:
    """Runs an effect once per key; ``scope`` names the participant in the key table."""

    def __init__(self, db: Database, scope: str) -> None:
        self.db = db
        self.scope = scope
        self._keys = IdempotencyKeys(db)

    def run_once(self, key: str, effect: Callable[[Connection], T]) -> T:
        """Run ``effect(conn)`` inside a transaction unless ``key`` was seen; return its result."""
        with self._keys.transaction() as conn:
            return self.run_once_in(conn, key, effect)

    def run_once_in(self, conn: Connection, key: str, effect: Callable[[Connection], T]) -> T:
        """As :meth:`run_once`, inside the caller's transaction (a transactional step)."""
        if self._keys.claim(conn, key, self.scope):
            self._fence_action_of(conn, key)
            result = effect(conn)
            if result is not None:  # the claimed row's result is NULL already: a statement saved
                self._keys.store_result(conn, key, result)
            return result
        try:
            replayed: T = self._keys.replay(conn, key)
        except ActionFenced:
            metrics.action_fenced(self.scope)
            raise
        after_commit(conn, self._absorbed)
        return replayed

    def seen(self, key: str) -> bool:
        return self._keys.seen(key)

    def duplicates(self, key: str) -> int:
        """How many repeated calls with ``key`` the guard absorbed."""
        return self._keys.duplicates(key)

    def _fence_action_of(self, conn: Connection, key: str) -> None:
        action = action_key_of(key)
        if action is not None:
            self._keys.fence(conn, action, self.scope)

    def _absorbed(self) -> None:
        metrics.duplicate_absorbed(self.scope)
