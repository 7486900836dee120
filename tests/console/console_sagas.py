"""Sagas the console tests run: an order that can be made to dead-letter, and a hostile one."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from engine import NO_RETRY, NonRetryableError, Retry, Saga, StepContext, StepKind

#: Business keys whose ``ship`` step fails; a test removes its key to let a retry succeed.
FAILING: set[str] = set()
#: Seconds ``ship`` takes per business key, so a browser can watch the saga run.
SLOW: dict[str, float] = {}


def reserve(ctx: StepContext) -> dict[str, Any]:
    return {"reservation": f"R-{ctx.business_key}"}


def release(ctx: StepContext, output: Any) -> None:
    return None


def charge(ctx: StepContext) -> dict[str, Any]:
    return {"charged": ctx.payload.get("amount", 0)}


def ship(ctx: StepContext) -> dict[str, Any]:
    if ctx.business_key in FAILING:
        raise NonRetryableError(f"carrier rejected parcel for {ctx.business_key}")
    time.sleep(SLOW.get(ctx.business_key or "", 0.0))
    return {"tracking": f"T-{ctx.business_key}"}


order = Saga(
    "order",
    default_retry=Retry(max_attempts=2, initial_delay=timedelta(0)),
    default_compensation_retry=NO_RETRY,
)
order.add_step("reserve", reserve, release)
order.add_step("charge", charge, kind=StepKind.PIVOT)
order.add_step("ship", ship, retry=NO_RETRY)

#: Error text and payload an attacker controls: the console must show them inert.
SCRIPT = "<script>alert('owned')</script>"


def poke(ctx: StepContext) -> None:
    raise NonRetryableError(f"participant said {SCRIPT}")


def unpoke(ctx: StepContext, output: Any) -> None:
    raise NonRetryableError(f"undo failed too {SCRIPT}")


hostile = Saga("hostile", default_retry=NO_RETRY, default_compensation_retry=NO_RETRY)
hostile.add_step("poke", poke, unpoke)

SAGAS = [order, hostile]
