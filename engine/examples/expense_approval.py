"""Approve an expense: hold the funds, wait for the manager's approval, pay it out.

The wait is a signal step: ``saga signal ID manager_approval`` (or the console's
*Send signal* button, or ``engine.signal(...)``) delivers the approval, and its
data becomes the step's output. A manager usually answers within seconds; one
who has not answered after :data:`EXPECTED_APPROVAL` plus the saga's grace has
the saga flagged **stuck** by the sweeper, though the wait may still take a
signal until its one-hour timeout. The operator then sends the approval from the
console, or force-compensates, which releases the held funds. ::

    saga -A engine.examples.expense_approval start approve_expense --business-key EXP-1 \\
        --payload '{"employee": "Grace Hopper", "amount_cents": 12000}'
    saga -A engine.examples.expense_approval signal ID manager_approval \\
        --data '{"approved_by": "ada"}'

Payload
-------
``employee``, ``amount_cents`` (optional). Faults go to the ``ledger``
participant (:mod:`engine.examples.participants`); ``{"fail": {"ledger":
"slow:20"}}`` makes holding the funds take 20 seconds, far over the second it is
expected to take, so the saga is flagged stuck and then goes on by itself.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from engine import Retry, Saga, SagaEngine, StepContext
from engine.examples.participants import Participant

#: How long a manager usually takes to answer; past it (plus the grace) the saga is stuck.
EXPECTED_APPROVAL = timedelta(seconds=10)
#: The event the waiting step takes.
APPROVAL = "manager_approval"

ledger = Participant("ledger", "expense_ledger", undone_status="released")
payouts = Participant("payout", "expense_payouts")
PARTICIPANTS = (ledger, payouts)

approve_expense = Saga(
    "approve_expense",
    version=1,
    default_timeout=timedelta(seconds=60),
    default_retry=Retry(max_attempts=3, initial_delay=timedelta(milliseconds=200)),
    # Short, for the example: flagged stuck soon after a step overruns what it is expected to take.
    stuck_grace=timedelta(seconds=5),
)


def init_engine(engine: SagaEngine) -> None:
    """Bind the participants to the engine's database (called by ``saga -A``)."""
    for participant in PARTICIPANTS:
        participant.bind(engine.store.db)


@approve_expense.step(expected_duration=timedelta(seconds=1))
def hold_funds(ctx: StepContext) -> dict[str, Any]:
    return ledger.act(ctx, {"employee": _get(ctx, "employee", "Grace Hopper"), **_amount(ctx)})


@hold_funds.compensate
def release_funds(ctx: StepContext, hold: dict[str, Any] | None) -> None:
    ledger.undo(ctx)


approve_expense.wait_for(APPROVAL, timeout=timedelta(hours=1), expected_duration=EXPECTED_APPROVAL)


@approve_expense.step(expected_duration=timedelta(seconds=1))
def pay_out(ctx: StepContext) -> dict[str, Any]:
    approval = ctx.outputs.get(APPROVAL) or {}
    approver = approval.get("approved_by", "unknown") if isinstance(approval, dict) else "unknown"
    return payouts.act(ctx, {"approved_by": approver, **_amount(ctx)})


@pay_out.compensate
def reverse_payout(ctx: StepContext, payout: dict[str, Any] | None) -> None:
    payouts.undo(ctx)


def _amount(ctx: StepContext) -> dict[str, Any]:
    return {"amount_cents": _get(ctx, "amount_cents", 12000)}


def _get(ctx: StepContext, field: str, default: Any) -> Any:
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    return payload.get(field, default)
