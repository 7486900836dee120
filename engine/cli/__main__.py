"""``python -m engine.cli``: the engine's ``saga`` commands, for processes started without
the script (workers, sweepers, participants); the console's commands are in ``console.cli``."""

from engine.cli import main

main()
