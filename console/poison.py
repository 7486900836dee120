"""The *Set aside* page: the newest records of the Redis poison stream, read-only.

What a reader on a Redis stream could not handle (a malformed command, reply,
doorbell or event; a reply the store refused; an entry taken over too often)
is moved to ``<prefix>:poison`` by the Redis bus. This page reads the newest
of them (:class:`console.services.PoisonReader`, one XREVRANGE ... COUNT), so
the on-call engineer the ``SagaEntriesSetAside`` alert wakes sees them without
redis-cli.

Everything in a record came from Redis and is untrusted: the template escapes
it, and :func:`visible` (the engine's :func:`engine.display.visible`, through
:mod:`console.services`) turns control and bidirectional characters into
``\\xNN`` / ``\\uNNNN`` escapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from flask import Blueprint, current_app, render_template, request
from flask.typing import ResponseReturnValue

from console import services
from console.services import PoisonReader, PoisonRecord
from engine.errors import TransportError
from engine.inputs import optional_int

bp = Blueprint("poison", __name__)

#: Records shown without ``?limit=``.
DEFAULT_LIMIT = 50
#: The most ``?limit=`` may ask for: one XREVRANGE of this many stays fast.
MAX_LIMIT = 500
#: The raw field that is pretty-printed when it holds JSON (a command's or reply's body).
BODY = b"body"
# The reason engine.transport.redis_streams gives an entry taken over too often.
_REDELIVERED = re.compile(r"delivered \d+ times\b")


class Why(StrEnum):
    """Why an entry was set aside, read from its reason (the metric's ``why`` label)."""

    MALFORMED = "malformed"
    REDELIVERED = "redelivered"
    REFUSED = "refused by the store"

    @property
    def slug(self) -> str:
        """The metric's ``why`` value, also the badge's CSS class suffix."""
        return self.name.lower()

    @classmethod
    def of(cls, reason: str) -> Why:
        """The kind of ``reason``: see ``_over_the_cap`` in ``engine.transport.redis_streams``."""
        if _REDELIVERED.match(reason):
            return cls.REDELIVERED
        if reason.startswith("the store refused it"):
            return cls.REFUSED
        return cls.MALFORMED


@dataclass(frozen=True)
class Field:
    """One of the entry's own fields, as text fit to show."""

    name: str
    value: str
    #: True when ``value`` is the field's JSON, indented (a ``body`` that parses).
    json: bool = False


@dataclass(frozen=True)
class SetAside:
    """A poison record as the page shows it."""

    id: str
    at: int
    source_stream: str
    source_id: str
    why: Why
    reason: str
    #: The saga the entry names, when its ``saga_id`` field has a saga id's shape.
    saga_id: str | None
    fields: tuple[Field, ...]


@bp.get("/poison")
def set_aside() -> ResponseReturnValue:
    """The newest poison records, newest first (``?limit=``, 1 to :data:`MAX_LIMIT`)."""
    limit = parse_limit(request.args)
    poison = services.get().poison
    if poison.stream is None:
        return _page(limit)  # no Redis: nothing is set aside where another process can read it
    try:
        records = poison.newest(limit)
    except TransportError as exc:
        current_app.logger.warning("cannot read the poison stream: %s", exc)
        return _page(limit, stream=poison.stream, problem=str(exc)), 503
    return _page(limit, stream=poison.stream, records=[describe(r) for r in records])


def _page(
    limit: int,
    *,
    stream: str | None = None,
    records: list[SetAside] | None = None,
    problem: str | None = None,
) -> str:
    """The page: the records, or (``records`` None) why there are none to show."""
    return render_template(
        "poison.html",
        limit=limit,
        max_limit=MAX_LIMIT,
        stream=stream,
        records=records,
        problem=problem,
    )


def parse_limit(args: Mapping[str, str]) -> int:
    """``?limit=``: how many records to show, 1 to :data:`MAX_LIMIT`; absent means the default."""
    found = optional_int("limit", args.get("limit"), low=1, high=MAX_LIMIT)
    return DEFAULT_LIMIT if found is None else found


def describe(record: PoisonRecord) -> SetAside:
    """What the page shows of ``record``: every text made visible, the saga it names."""
    return SetAside(
        id=record.id,
        at=record.at,
        source_stream=visible(record.source_stream),
        source_id=visible(record.source_id),
        why=Why.of(record.reason),
        reason=visible(record.reason),
        saga_id=PoisonReader.saga_id(record),
        fields=tuple(_field(name, value) for name, value in record.fields.items()),
    )


def visible(text: str) -> str:
    """``text`` with control and bidirectional characters as ``\\xNN`` / ``\\uNNNN`` escapes.

    Tabs and newlines stay: the page shows the fields as preformatted text.
    HTML is left to the template's escaping.
    """
    return services.visible(text, keep="\t\n")


def _field(name: bytes, value: bytes) -> Field:
    text = value.decode("utf-8", "replace")
    if name == BODY:
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            pass  # not JSON (that may be why it was set aside): shown as it is
        else:
            pretty = json.dumps(parsed, indent=2, sort_keys=True, ensure_ascii=False)
            return Field(visible(name.decode("utf-8", "replace")), visible(pretty), json=True)
    return Field(visible(name.decode("utf-8", "replace")), visible(text))
