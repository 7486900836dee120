"""Order fulfilment as a choreography: inventory, payment and shipping react to each other.

No coordinator: each service listens for the others' domain events and
publishes its own. Run each as its own process (Redis required)::

    export SAGA_APP=engine.examples.order_fulfillment_choreography
    saga participant --service inventory
    saga participant --service payment
    saga participant --service shipping
    saga participant --service choreography-tracker

then place an order with :func:`place_order` (or ``EventBus.publish("OrderPlaced", ...)``).

The flow::

    OrderPlaced -> inventory reserves -> InventoryReserved
                -> payment charges    -> PaymentCharged  (or PaymentFailed)
                -> shipping ships     -> OrderShipped    (or ShippingFailed)
    PaymentFailed  -> inventory releases its reservation -> InventoryReleased
    ShippingFailed -> payment refunds -> PaymentRefunded; inventory releases -> InventoryReleased

An operator's force-compensate (console, or
:class:`~engine.choreography.operations.ChoreographyOperations`) publishes ``PaymentRefunded``
and ``InventoryReleased`` with ``"forced": true``; payment and inventory then
carry them out.

An order asks for faults through its data: ``"card": "declined"`` makes the
payment fail, ``"ship": "fail"`` makes shipping fail, ``"ship_delay_s": N``
makes shipping wait N seconds before acting (to kill it mid-handler),
``"ship": "hang"`` makes shipping never answer (a missing event).

Each service records its effects in ``choreo_effects`` (in ``SAGA_DATABASE_URL``'s
database, for the example's sake; :func:`init_event_handlers` creates it when a
``saga participant`` process starts), once per idempotency key, behind the
:class:`~engine.idempotency.IdempotencyGuard`: an event delivered twice has
its effect once. :data:`ORDER` declares the choreography, so the tracker
(the ``choreography-tracker`` service) keeps an instance per order that the
console shows like an orchestrated saga.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from engine.choreography.declaration import Choreography, ChoreoStep
from engine.choreography.handlers import EventBus, EventContext, EventHandlers
from engine.choreography.runtime import EventRuntime

ORDER = Choreography(
    name="order_choreography",
    start="OrderPlaced",
    steps=(
        ChoreoStep(
            "reserve_inventory", "InventoryReserved", "InventoryReleased", timedelta(seconds=10)
        ),
        ChoreoStep("charge_payment", "PaymentCharged", "PaymentRefunded", timedelta(seconds=10)),
        ChoreoStep("ship_order", "OrderShipped", None, timedelta(seconds=30)),
    ),
    failures={"PaymentFailed": "charge_payment", "ShippingFailed": "ship_order"},
)

inventory = EventHandlers("inventory")
payment = EventHandlers("payment")
shipping = EventHandlers("shipping")

effects = sa.Table(
    "choreo_effects",
    sa.MetaData(),
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("service", sa.String(50), nullable=False),
    sa.Column("action", sa.String(50), nullable=False),
    sa.Column("order_id", sa.String(200), nullable=False),
)


def create_tables(db: sa.Engine) -> None:
    """The example's effect table, if it is not there yet.

    Several participant processes start at once: when another one created the
    table between our look and our CREATE, the database refuses ours, and the
    table is there all the same.
    """
    try:
        effects.metadata.create_all(db, checkfirst=True)
    except sa.exc.DBAPIError:
        if not sa.inspect(db).has_table(effects.name):
            raise


def init_event_handlers(runtime: EventRuntime) -> None:
    """Create the effect table (``saga participant`` calls this before any event is read)."""
    create_tables(runtime.store.db)


def place_order(bus: EventBus, order_id: str, **order: Any) -> str:
    """Publish ``OrderPlaced`` for ``order_id``; the order id is the correlation id."""
    return bus.publish("OrderPlaced", {"order_id": order_id, **order}, correlation_id=order_id)


def _effect(ctx: EventContext, service: str, action: str) -> None:
    order_id = str(ctx.event.data.get("order_id", ctx.event.correlation_id))

    def record(conn: Connection) -> None:
        conn.execute(
            effects.insert().values(
                key=ctx.idempotency_key, service=service, action=action, order_id=order_id
            )
        )

    ctx.guard.run_once(ctx.idempotency_key, record)


def _order(ctx: EventContext) -> dict[str, Any]:
    return dict(ctx.event.data)


@inventory.on("OrderPlaced")
def reserve(ctx: EventContext) -> None:
    _effect(ctx, "inventory", "reserve")
    ctx.publish("InventoryReserved", _order(ctx))


@inventory.on("PaymentFailed")
def release_after_payment(ctx: EventContext) -> None:
    _effect(ctx, "inventory", "release")
    ctx.publish("InventoryReleased", _order(ctx))


@inventory.on("PaymentRefunded")
def release_after_refund(ctx: EventContext) -> None:
    if ctx.event.data.get("forced"):
        return  # a forced compensation publishes the release itself, once
    _effect(ctx, "inventory", "release")
    ctx.publish("InventoryReleased", _order(ctx))


@inventory.on("InventoryReleased")
def release_when_forced(ctx: EventContext) -> None:
    # An operator force-compensated the order: the console published the
    # compensating event on inventory's behalf, and inventory carries it out.
    if ctx.event.data.get("forced"):
        _effect(ctx, "inventory", "release")


@payment.on("PaymentRefunded")
def refund_when_forced(ctx: EventContext) -> None:
    if ctx.event.data.get("forced"):
        _effect(ctx, "payment", "refund")


@payment.on("InventoryReserved")
def charge(ctx: EventContext) -> None:
    order = _order(ctx)
    if order.get("card") == "declined":
        ctx.publish("PaymentFailed", {**order, "reason": "card declined"})
        return
    _effect(ctx, "payment", "charge")
    ctx.publish("PaymentCharged", order)


@payment.on("ShippingFailed")
def refund(ctx: EventContext) -> None:
    _effect(ctx, "payment", "refund")
    ctx.publish("PaymentRefunded", _order(ctx))


@shipping.on("PaymentCharged")
def ship(ctx: EventContext) -> None:
    order = _order(ctx)
    delay = float(order.get("ship_delay_s", 0))
    if delay and ctx.attempt == 1:
        time.sleep(delay)  # the fault a test asks for: time to kill this process
    if order.get("ship") == "hang":
        return  # the event the tracker expects never comes
    if order.get("ship") == "fail":
        ctx.publish("ShippingFailed", {**order, "reason": "no courier"})
        return
    _effect(ctx, "shipping", "ship")
    ctx.publish("OrderShipped", order)
