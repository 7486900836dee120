"""A module for ``saga -A tests.helpers.hostile_app ...``: a saga whose participant fails
with the error its payload names, so that untrusted text reaches every field the
CLI prints (errors and dead letters as well as keys and payloads)."""

from __future__ import annotations

from typing import Any

from engine import Retry, Saga
from engine.definition import StepContext

ONCE = Retry(max_attempts=1)


def _fail(ctx: StepContext, *_: Any) -> None:
    # A participant's error message is text from another service: anything at all.
    raise RuntimeError(ctx.payload["error"])


hostile = Saga("hostile", default_retry=ONCE, default_compensation_retry=ONCE)
hostile.add_step("charge", _fail, _fail)
hostile.validate()
