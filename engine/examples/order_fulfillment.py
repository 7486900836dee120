"""Fulfil an order: reserve inventory, charge the payment (the pivot), ship the order.

Reserving inventory is compensatable: it is released if the payment is
declined. Charging the payment is the pivot, the point of no return: once it
succeeded the order only moves forward, so shipping is retriable: it retries,
and when its retries run out the saga is dead-lettered for an operator
(``saga retry ID --reason ...``) rather than refunded. A payment that times
out has an unknown outcome, so it is dead-lettered too, for a person to check.

Payload
-------
``order``, ``sku``, ``quantity``, ``amount_cents``, ``address`` (all
optional). Faults by participant (``inventory``, ``payment``, ``shipping``);
the rules are in :mod:`engine.examples.participants`::

    {"fail": {"shipping": "flaky:2"}}    the carrier fails twice, then ships
    {"fail": {"payment": "permanent"}}   payment declined: inventory released, compensated
    {"fail": {"shipping": "flaky:3"}}    the carrier is down for all three attempts: the
                                         saga is dead-lettered; an operator retry ships it

Records: ``inventory_reservations`` (released ones have status
``released``), ``payments``, ``shipments``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from engine import Retry, Saga, SagaEngine, StepContext
from engine.examples.participants import Participant

RETRY = Retry(
    max_attempts=3,
    initial_delay=timedelta(milliseconds=200),
    backoff=2.0,
    max_delay=timedelta(seconds=2),
)
COMPENSATION_RETRY = Retry(
    max_attempts=4,
    initial_delay=timedelta(milliseconds=200),
    backoff=2.0,
    max_delay=timedelta(seconds=2),
)

inventory = Participant("inventory", "inventory_reservations", undone_status="released")
payments = Participant("payment", "payments")
shipments = Participant("shipping", "shipments")
PARTICIPANTS = (inventory, payments, shipments)

fulfil_order = Saga(
    "fulfil_order",
    version=1,
    default_timeout=timedelta(seconds=2),
    default_retry=RETRY,
    default_compensation_retry=COMPENSATION_RETRY,
)


def init_engine(engine: SagaEngine) -> None:
    """Bind the participants to the engine's database (called by ``saga -A``)."""
    for participant in PARTICIPANTS:
        participant.bind(engine.store.db)


@fulfil_order.step
def reserve_inventory(ctx: StepContext) -> dict[str, Any]:
    return inventory.act(
        ctx, {"sku": _get(ctx, "sku", "BOOK-42"), "quantity": _get(ctx, "quantity", 1)}
    )


@reserve_inventory.compensate
def release_inventory(ctx: StepContext, reservation: dict[str, Any] | None) -> None:
    inventory.undo(ctx)


@fulfil_order.step(pivot=True)
def charge_payment(ctx: StepContext) -> dict[str, Any]:
    return payments.act(ctx, {"amount_cents": _get(ctx, "amount_cents", 4999)})


@fulfil_order.step
def ship_order(ctx: StepContext) -> dict[str, Any]:
    return shipments.act(
        ctx,
        {
            "address": _get(ctx, "address", "1 Main St, Springfield"),
            "order": _get(ctx, "order", None),
        },
    )


def _get(ctx: StepContext, field: str, default: Any) -> Any:
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    return payload.get(field, default)
