"""A worker process for the crash and race tests: ``python -m tests.helpers.worker_proc``.

It knows the test sagas, reads the usual ``SAGA_*`` settings from the
environment, prints ``ready`` once its worker runs, and drains on SIGTERM.
SIGKILL, of course, it cannot handle: that is the point of the crash test.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from engine import SagaEngine, Settings
from tests.helpers.participant import Participant
from tests.helpers.sagas import all_sagas


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    settings = Settings.from_env()
    participant = Participant(settings.database_url)
    engine = SagaEngine(all_sagas(participant), settings=settings)
    worker = engine.worker()

    def drain(signum: int, frame: FrameType | None) -> None:
        worker.stop()  # sets the flag; run() below finishes what it holds and returns

    signal.signal(signal.SIGTERM, drain)
    print("ready", flush=True)
    worker.run()
    engine.close()
    participant.close()


if __name__ == "__main__":
    main()
