"""The connection a transactional step writes through: SQLAlchemy's, named here so that
the definitions above the store can mention it without importing SQLAlchemy."""

from sqlalchemy import Connection

__all__ = ["Connection"]
