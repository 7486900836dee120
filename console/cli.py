"""The ``saga`` command as installed: the engine's commands and the console's.

The engine's group (:data:`engine.cli.main`) does not know the console,
since nothing in the engine imports it; this module adds ``saga console``,
``saga user ...`` and ``saga demo`` to it, and is the ``saga`` script's entry
point (pyproject.toml). ``python -m console.cli`` runs it without the script;
``python -m engine.cli`` runs the engine's commands alone, which is all a
worker, sweeper or participant process needs.
"""

from __future__ import annotations

from console.commands import console_command, demo_command, user_group
from engine.cli import with_commands

__all__ = ["main"]

main = with_commands(console_command, user_group, demo_command)

if __name__ == "__main__":
    main()
