"""What every Redis stream reader shares: an entry as read, a poison record, how long to block.

The command bus, the doorbells and the domain-event log all read entries of
this shape; what an entry means is the reader's business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


#: Prefix of a poison record's copies of the entry's own fields.
RAW_PREFIX = b"raw:"


@dataclass(frozen=True)
class PoisonRecord:
    """An entry set aside on the poison stream: malformed, or taken over too often."""

    #: Id of this record on the poison stream.
    id: str
    #: Id the entry had on its own stream.
    source_id: str
    reason: str
    #: When it was set aside, epoch milliseconds.
    at: int
    #: The entry's fields exactly as they were, bytes for bytes.
    fields: dict[bytes, bytes]
    #: The stream the entry came from; empty on records written before it was kept.
    source_stream: str = ""


@dataclass(frozen=True)
class Entry:
    """One entry read from a stream: where it came from, its id, and its raw fields."""

    stream: str
    id: str
    fields: Mapping[bytes, bytes]
