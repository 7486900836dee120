"""The database handles the layers above the store may name without importing SQLAlchemy:
the connection a transactional step writes through, and the database (SQLAlchemy's
``Engine``) a participant hands to :class:`~engine.idempotency.IdempotencyGuard`."""

from sqlalchemy import Connection
from sqlalchemy import Engine as Database

__all__ = ["Connection", "Database"]
