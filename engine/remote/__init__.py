"""Remote steps: commands sent to participant services, replies recorded by workers.

- :mod:`.messages`: the command and reply as they travel, parsed strictly;
- :mod:`.dispatch`: sending the command of an attempt once it is stored;
- :mod:`.replies`: the workers' reply listener and the handler that records replies;
- :mod:`.participant`: the participant side, ``ParticipantService`` and its runtime.
"""

from engine.remote.participant import ParticipantRuntime, ParticipantService

__all__ = ["ParticipantRuntime", "ParticipantService"]
