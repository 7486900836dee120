"""What each operator action will do to an instance, in words for the confirmation page."""

from __future__ import annotations

from engine.model import Instance
from engine.operations import Action
from engine.queries import OpenWait
from engine.states import CompensationStatus, Phase, SagaState, side_in_play

LABELS = {
    Action.RETRY: "Retry now",
    Action.SKIP: "Skip step",
    Action.COMPENSATE: "Force-compensate",
    Action.CANCEL: "Cancel saga",
}
#: The button that sends a signal to a waiting step.
SEND_SIGNAL = "Send signal"
#: The dead-letter action that closes a dead letter an operator dealt with by hand.
RESOLVE = "Resolve by hand"
#: Compensations that were due and have not run (or failed), so their steps' effects remain.
_NOT_UNDONE = (CompensationStatus.PENDING, CompensationStatus.RUNNING, CompensationStatus.FAILED)


def side(inst: Instance) -> str:
    """``action`` or ``compensation``: the side of the current step in play, or last in play."""
    in_play = side_in_play(inst.state, inst.current.comp_status)
    return "compensation" if in_play is Phase.COMPENSATE else "action"


def not_compensated(inst: Instance) -> list[str]:
    """The steps whose compensation was due but has not run: what a stop leaves in place.

    Latest step first, the order the engine would have undone them in."""
    return [s.name for s in reversed(inst.steps) if s.comp_status in _NOT_UNDONE]


def left_in_place(inst: Instance) -> str:
    """A sentence naming the steps a stop now leaves not compensated, or "" when none."""
    names = not_compensated(inst)
    if not names:
        return ""
    listed = ", ".join(f"“{n}”" for n in names)
    if len(names) == 1:
        what = f"step {listed} was not compensated and stays as it is"
        undo = "it"
    else:
        what = f"steps {listed} were not compensated and stay as they are"
        undo = "them"
    return f"The saga is half compensated: {what}: the engine will not undo {undo} after this."


def consequence(action: Action, inst: Instance) -> str:
    """One paragraph: what happens when the operator confirms ``action`` on ``inst``."""
    step = inst.current.name
    undoing = inst.phase is Phase.COMPENSATE
    if action is Action.CANCEL:
        return _cancel(inst)
    if action is Action.RETRY:
        what = f"the compensation of step “{step}”" if undoing else f"step “{step}”"
        return (
            f"Runs {what} again now, ignoring any backoff wait, with a fresh retry "
            "budget. The saga goes back to "
            f"{'compensating' if undoing else 'running'} and the workers pick it up."
        )
    if action is Action.SKIP:
        if undoing:
            return (
                f"Marks the compensation of step “{step}” as done by hand, without running "
                "it, and goes on compensating the earlier steps. Only do this after you "
                "have undone that step's effect yourself."
            )
        return (
            f"Marks step “{step}” as done by hand, without running it, and goes on with "
            "the next step. Only do this if its effect really happened or is not needed: "
            "the engine will not run it, and later steps will not see its output."
        )
    if action is Action.COMPENSATE:
        return (
            f"Stops going forward and undoes every step that started, in reverse order, "
            f"beginning with “{step}”. An attempt still in flight is recorded as timed "
            "out and undone too. The saga ends compensated."
        )
    raise ValueError(f"no words for {action!r}")


def _cancel(inst: Instance) -> str:
    text = (
        "Gives up on the saga: it stops where it stands and ends cancelled. Nothing more "
        "runs and nothing is undone: steps that already acted stay done, so clean them up "
        "by hand if needed. This cannot be reversed."
    )
    parts = [text, left_in_place(inst)]
    if inst.state is SagaState.FAILED:
        parts.append(
            f"If you have already finished or undone its work yourself, use “{RESOLVE}” "
            "instead: it ends the same way, but records that the work was dealt with by "
            "hand, not abandoned."
        )
    return " ".join(p for p in parts if p)


def resolve_consequence(inst: Instance) -> str:
    """What resolving ``inst``'s dead letter by hand does, and how it differs from cancelling."""
    parts = [
        "Records that you dealt with this dead letter yourself (you finished or undid its "
        "work outside the engine), closes it, and ends the saga cancelled: nothing more "
        "runs and the engine undoes nothing. It leaves the dead-letter queue, marked "
        "“resolved by hand”, and cannot be reversed.",
        left_in_place(inst),
        f"Unlike “{LABELS[Action.CANCEL]}”, which gives the saga up as it stands, this "
        "says its work was taken care of: do it only once it really was.",
    ]
    return " ".join(p for p in parts if p)


def edit_retry_consequence(inst: Instance) -> str:
    """What editing the payload then retrying does to ``inst``: which side runs again."""
    step = inst.current.name
    if inst.phase is Phase.COMPENSATE:
        what = (
            f"runs the compensation of step “{step}” again now (it reads the payload too), "
            "with a fresh retry budget; the saga goes back to compensating"
        )
    else:
        what = f"runs step “{step}” again now with a fresh retry budget"
    return (
        f"Replaces the saga's payload (the input every step reads) with the JSON below, then "
        f"{what}. Steps that already ran keep the outputs they produced from the old "
        "payload. The audit log records the payload before and after."
    )


def signal_consequence(wait: OpenWait) -> str:
    """One paragraph: what happens when the operator sends the signal ``wait`` waits for."""
    step = f"Step “{wait.step}”"
    if wait.waiting:
        return (
            f"{step} waits for this event now: it ends at once with the data below as "
            "its output, and the saga moves on (to the next step, or it completes). Only one "
            "signal per event is taken, so this cannot be sent again or taken back."
        )
    return (
        f"{step} has not begun waiting yet: the signal is stored, and the step "
        "takes it, with the data below as its output, as soon as it begins instead of "
        "waiting. Only one signal per event is kept, so this cannot be sent again or taken back."
    )
