"""What each operator action will do to an instance, in words for the confirmation page."""

from __future__ import annotations

from engine.model import Instance
from engine.operations import Action
from engine.queries import OpenWait
from engine.states import Phase

LABELS = {
    Action.RETRY: "Retry now",
    Action.SKIP: "Skip step",
    Action.COMPENSATE: "Force-compensate",
    Action.CANCEL: "Cancel saga",
}
#: The button that sends a signal to a waiting step.
SEND_SIGNAL = "Send signal"


def consequence(action: Action, inst: Instance) -> str:
    """One paragraph: what happens when the operator confirms ``action`` on ``inst``."""
    step = inst.current.name
    undoing = inst.phase is Phase.COMPENSATE
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
    return (
        "Stops the saga where it stands: nothing more runs and nothing is undone. Steps "
        "that already acted stay done, so clean them up by hand if needed. "
        "This cannot be reversed."
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
