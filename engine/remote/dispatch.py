"""Sending commands: the attempt just begun and stored, or every one in flight again."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from engine.collaborators import Collaborators
from engine.definition import Saga
from engine.errors import TransportError
from engine.model import Instance, idempotency_key
from engine.registry import Registry
from engine.remote.messages import Command
from engine.states import CompensationStatus, Phase, StepStatus
from engine.transport.commands import WORKERS, CommandBus
from engine.transport.streams import Entry

log = logging.getLogger(__name__)


# -- sending commands ----------------------------------------------------------


class Dispatcher:
    """Sends the command of an attempt that was just begun and stored."""

    def __init__(self, bus: CommandBus, clock: Callable[[], int]) -> None:
        self.bus = bus
        self.clock = clock

    def send(self, inst: Instance, index: int, phase: Phase, defn: Saga) -> bool:
        """Send the command for the attempt of step ``index`` in flight; False if Redis is down.

        Call only after the transaction that began the attempt committed. A
        command that cannot be sent is not an error for the caller: the
        attempt times out at its stored deadline and the retry policy applies.
        """
        command = command_for(inst, index, phase, defn, self.clock())
        try:
            self.bus.send(self.bus.commands_stream(command.service), command.to_fields())
        except TransportError as exc:
            log.warning(
                "saga %s: command %s not sent (%s); the attempt times out at its deadline",
                inst.id,
                command.command,
                exc,
                extra={"saga_id": inst.id, "correlation_id": inst.correlation_id},
            )
            return False
        return True

    def send_many(
        self, attempts: Sequence[tuple[Instance, int, Phase, Saga]], acks: Sequence[Entry] = ()
    ) -> int:
        """Send several commands in one round trip; how many went (0 or all).

        ``acks``: replies to acknowledge in the same round trip, once recorded.
        """
        now = self.clock()
        commands = [command_for(inst, i, phase, defn, now) for inst, i, phase, defn in attempts]
        entries = [(self.bus.commands_stream(c.service), c.to_fields()) for c in commands]
        try:
            self.bus.send_and_ack(entries, WORKERS, acks)
        except TransportError as exc:
            # Replies left unacknowledged are taken over later and discarded as repeats.
            log.warning(
                "%d commands not sent (%s); their attempts time out at their deadlines",
                len(commands),
                exc,
            )
            return 0
        return len(commands)


def command_for(inst: Instance, index: int, phase: Phase, defn: Saga, now: int) -> Command:
    """The command for the attempt of step ``index`` in flight in ``inst``."""
    sdef = defn.steps[index]
    assert sdef.remote is not None, f"step {sdef.name!r} is not remote"
    name = sdef.remote.command(phase)
    assert name is not None, f"step {sdef.name!r} has no compensation command"
    step = inst.steps[index]
    deadline = step.deadline_at if phase is Phase.ACTION else step.comp_deadline_at
    return Command(
        command=name,
        saga_id=inst.id,
        saga_name=inst.saga_name,
        step=step.name,
        step_index=index,
        phase=phase,
        attempt=step.attempts_of(phase),
        idempotency_key=idempotency_key(inst.id, step.name, phase),
        correlation_id=inst.correlation_id,
        business_key=inst.business_key,
        deadline_at=deadline or now,
        sent_at=now,
        payload=inst.payload,
        outputs=inst.outputs(),
        output=step.output if phase is Phase.COMPENSATE else None,
    )


def resend_in_flight(
    collaborators: Collaborators, *, batch: int = 500, begun_before: int | None = None
) -> int:
    """Send again the command of every remote attempt in flight before its deadline.

    For when the command streams lost their entries (Redis flushed or
    restarted empty): with ``begun_before`` (epoch ms, when the streams were
    found empty), only attempts begun before then, whose commands may be lost.
    Returns how many were sent.
    """
    c = collaborators
    remote = _remote_sagas(c.registry)
    if not remote:
        return 0
    now = c.clock()
    dispatcher = Dispatcher(c.bus, c.clock)
    ids = c.store.sweeps.remote_attempts_in_flight(now, remote, batch)
    sent = 0
    for first in range(0, len(ids), batch):
        attempts = []
        for inst in c.store.load_many(ids[first : first + batch]).values():
            defn = c.registry.get(inst.saga_name, inst.saga_version)
            flight = in_flight_remote(inst, defn, now)
            if flight is not None and _begun_before(inst, flight[1], begun_before):
                attempts.append((inst, flight[0], flight[1], defn))
        sent += dispatcher.send_many(attempts)
    if sent:
        log.info("sent again %d commands whose attempts are in flight", sent)
    return sent


def in_flight_remote(inst: Instance, defn: Saga, now: int) -> tuple[int, Phase] | None:
    """(step index, phase) of a remote attempt in flight before its deadline, if any."""
    if not inst.state.is_active or defn.steps[inst.cursor].remote is None:
        return None
    phase = inst.phase
    step = inst.current
    running = (
        step.status is StepStatus.RUNNING
        if phase is Phase.ACTION
        else step.comp_status is CompensationStatus.RUNNING
    )
    deadline = step.deadline_at if phase is Phase.ACTION else step.comp_deadline_at
    if running and deadline is not None and deadline > now:
        return inst.cursor, phase
    return None


def _remote_sagas(registry: Registry) -> list[tuple[str, int]]:
    return [(s.name, s.version) for s in registry if any(st.remote for st in s.steps)]


def _begun_before(inst: Instance, phase: Phase, moment: int | None) -> bool:
    step = inst.current
    began = step.started_at if phase is Phase.ACTION else step.comp_started_at
    return moment is None or began is None or began < moment
