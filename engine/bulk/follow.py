"""Following a bulk operation's applied items until their instances end.

One pass reads the items still followed (applied, not ended: a partial index
holds them) :data:`FOLLOW_BATCH` at a time, reads what became of their
instances in three queries per batch (:meth:`engine.store.reads.Reads.traces`),
decides each one with :func:`engine.outcomes.follow`, and stores the ones that
changed in one transaction per batch. It costs nothing per item per poll, and
nothing at all once every item has ended. The runner follows as it goes (its
failure threshold is judged on these results), and every reader of the report
follows before reading, so the report stays live after the run is over.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.bulk.model import FOLLOW_BATCH, BulkItem
from engine.outcomes import Followed, Trace, follow
from engine.store.bulk import BulkStore
from engine.store.reads import Reads


class Follower:
    """Brings the results of one operation's applied items up to date."""

    def __init__(self, bulk: BulkStore, reads: Reads, now: Callable[[], int]) -> None:
        self.bulk = bulk
        self.reads = reads
        self.now = now

    def follow(self, operation_id: str) -> None:
        """One pass over the items still followed, storing what changed."""
        after = 0
        while True:
            batch = self.bulk.open_items(operation_id, after, FOLLOW_BATCH)
            if batch:
                self._follow_batch(operation_id, batch)
            if len(batch) < FOLLOW_BATCH:
                return
            after = batch[-1].seq

    def _follow_batch(self, operation_id: str, batch: list[BulkItem]) -> None:
        since = min(_acted_at(item) for item in batch)
        traces = self.reads.traces(sorted({item.saga_id for item in batch}), since)
        now = self.now()
        changed: list[tuple[int, Followed]] = []
        for item in batch:
            found = follow(_acted_at(item), item.version_after or 0, traces[item.saga_id], now)
            if found.result is not item.result:
                changed.append((item.seq, found))
        if changed:
            self.bulk.settle(operation_id, changed)


def followed_at_once(acted_at: int, version_after: int, state: str) -> Followed:
    """What is known of an action the moment it was accepted: an action that ended the
    instance (a cancel) is final at once; anything else runs until followed."""
    return follow(acted_at, version_after, Trace(state, acted_at), acted_at)


def _acted_at(item: BulkItem) -> int:
    # Items applied before results were followed have no acted_at; their processing time
    # is a few milliseconds after the instance took the action.
    return item.acted_at or item.processed_at or 0
