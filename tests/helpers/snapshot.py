"""What is in the store, to check that a refused request or command wrote nothing."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from engine.store.schema import metadata

#: A bulk dry run keeps what it previewed (for the confirmation to act on), even when the
#: command that asked for it then stops for want of a confirmation: those previews are not
#: changes to anything an operator acts on, so they are left out of the comparison.
PREVIEWS = frozenset({"saga_bulk_snapshots", "saga_bulk_snapshot_items"})


class StoreSnapshot:
    """Reads every row of every store table, in a stable order, over one connection pool."""

    def __init__(self, url: str) -> None:
        self.db = sa.create_engine(url)

    def take(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every table's rows, sorted: two takes are equal when nothing was written between."""
        with self.db.connect() as conn:
            return {
                table.name: sorted((tuple(row) for row in conn.execute(sa.select(table))), key=repr)
                for table in metadata.sorted_tables
                if table.name not in PREVIEWS
            }

    def close(self) -> None:
        self.db.dispose()
