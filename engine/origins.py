"""Where an operator action came from, recorded beside the actor it claims.

The actor of an action is a claim: ``saga cancel ID --actor demo-admin`` names
anyone. The origin is what the engine knows of the door the action came
through, and is kept next to the claim in the audit log:

=========  ========================================================
kind       detail
=========  ========================================================
cli        the OS user and host that ran ``saga`` (``alice@ops-1``)
console    the signed-in user
api        the name of the token the request presented
sweeper    the sweeper process (its worker id)
engine     none: the engine's Python API, called in-process
unknown    none: recorded before origins were (schema 0011)
=========  ========================================================

A bulk operation keeps the origin of whoever created it, and each of its
items is recorded with that origin. An origin is a record, not a lock: anyone
who can write to the store can write anything there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

#: The longest detail kept (the column's size); a longer one is cut.
MAX_DETAIL = 200


class OriginKind(StrEnum):
    """The door an operator action came through."""

    CLI = "cli"
    CONSOLE = "console"
    API = "api"
    SWEEPER = "sweeper"
    ENGINE = "engine"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Origin:
    """An action's origin: its kind, and who or what behind it (see the module's table)."""

    kind: OriginKind
    detail: str | None = None

    def __post_init__(self) -> None:
        # Details come from the system (a host name, a token's name), not from a form:
        # cut to the column rather than refuse the action they describe.
        if self.detail is not None:
            object.__setattr__(self, "detail", self.detail[:MAX_DETAIL] or None)

    @classmethod
    def of(cls, kind: str, detail: str | None = None) -> Origin:
        """The origin stored as ``kind`` and ``detail``; a kind this code does not know
        (written by a newer release) reads as ``unknown``, its detail kept."""
        try:
            return cls(OriginKind(kind), detail)
        except ValueError:
            return cls(OriginKind.UNKNOWN, f"{kind}: {detail}" if detail else kind)

    @classmethod
    def console(cls, user: str) -> Origin:
        """An action of the console's signed-in ``user``."""
        return cls(OriginKind.CONSOLE, user)

    @classmethod
    def api(cls, token_name: str) -> Origin:
        """An action through the HTTP API, with the token named ``token_name``."""
        return cls(OriginKind.API, token_name)

    @classmethod
    def sweeper(cls, process: str) -> Origin:
        """An automatic action of the sweeper running as ``process``."""
        return cls(OriginKind.SWEEPER, process)

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else str(self.kind)


#: The origin of an action taken through the engine's Python API in-process (a
#: service's own code, a test), when its caller names none.
IN_PROCESS = Origin(OriginKind.ENGINE)
