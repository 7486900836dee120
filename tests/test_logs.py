"""Log lines from step code carry the saga id and correlation id."""

from __future__ import annotations

import logging

from engine import Saga, SagaEngine, Settings, StepContext
from engine.logs import ContextFilter

step_log = logging.getLogger("tests.step_code")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_step_code_logs_with_the_saga_and_correlation_ids(sqlite_url: str) -> None:
    def reserve(ctx: StepContext) -> None:
        step_log.warning("reserving for %s", ctx.payload["who"])

    saga = Saga("logged")
    saga.add_step("reserve", reserve)
    capture = _Capture()
    step_log.addHandler(capture)
    engine = SagaEngine([saga], settings=Settings(database_url=sqlite_url))
    try:
        inst = engine.run("logged", {"who": "ada"}, correlation_id="corr-42")
    finally:
        engine.close()
        step_log.removeHandler(capture)
    [record] = [r for r in capture.records if r.getMessage() == "reserving for ada"]
    assert record.saga_id == inst.id  # type: ignore[attr-defined]
    assert record.correlation_id == "corr-42"  # type: ignore[attr-defined]
