"""``python -m engine.cli``: the ``saga`` command, for processes started without the script."""

from engine.cli import main

main()
