"""The build's own step: the console's files that are not Python code (the wheel is the product).

``templates/`` and ``static/`` stay at the top of the repository. Every build
puts them where the console loads them, ``importlib.resources.files("console")``:

- a wheel maps them into the package, as ``console/templates`` and ``console/static``;
- an editable install links ``console/templates`` and ``console/static`` (git-ignored)
  to the top-level folders, so a checkout loads them the same way, and an edited
  template shows without installing again;
- an sdist carries them as they are, with the htmx file, so a wheel builds from it
  without npm.

htmx is ``static/vendor/htmx.min.js`` (git-ignored): the file of the npm package
``htmx.org`` at the version package-lock.json pins. When the file is missing or is
another version, the build runs ``npm ci`` (which checks the lock's integrity hash)
and copies it from ``node_modules/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HTMX_PACKAGE = "htmx.org"
HTMX = Path("static", "vendor", "htmx.min.js")
HTMX_IN_NODE_MODULES = Path("node_modules", HTMX_PACKAGE, "dist", "htmx.min.js")
#: Top-level folder -> where the console package holds it.
CONSOLE_FILES = {"templates": "console/templates", "static": "console/static"}
_VERSION_IN_FILE = re.compile(rb'version:"([^"]+)"')


class AssetError(Exception):
    """The console's files cannot be put in place; the message says what to do."""


def pinned_htmx(root: Path) -> str:
    """The htmx version package-lock.json pins."""
    lock = json.loads((root / "package-lock.json").read_text(encoding="utf-8"))
    version: str = lock["packages"][f"node_modules/{HTMX_PACKAGE}"]["version"]
    return version


def htmx_version(path: Path) -> str | None:
    """The version a built htmx file declares (``version:"2.0.11"``), None if there is none."""
    if not path.is_file():
        return None
    found = _VERSION_IN_FILE.search(path.read_bytes())
    return found.group(1).decode() if found else None


def vendor_htmx(root: Path) -> Path:
    """Make ``static/vendor/htmx.min.js`` the pinned version's file; return its path."""
    target = root / HTMX
    wanted = pinned_htmx(root)
    if htmx_version(target) == wanted:
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(
            f"{HTMX} is missing or not htmx {wanted}, and npm is not installed to fetch it "
            "(Debian: apt-get install npm; or build from the sdist, which carries the file)"
        )
    subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=root, check=True)
    source = root / HTMX_IN_NODE_MODULES
    if htmx_version(source) != wanted:
        raise AssetError(f"npm ci did not install htmx {wanted} at {HTMX_IN_NODE_MODULES}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def link_into_console(root: Path) -> None:
    """Link console/templates and console/static to the top-level folders (editable installs)."""
    for folder, inside in CONSOLE_FILES.items():
        link = root / inside
        wanted = Path("..", folder)
        if link.is_symlink() and Path(os.readlink(link)) == wanted:
            continue
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise AssetError(
                f"{inside} exists and is not a link to {folder}/: move it away "
                f"({folder}/ at the top of the repository is the one source)"
            )
        link.symlink_to(wanted, target_is_directory=True)


class ConsoleFilesHook(BuildHookInterface):
    """Puts templates, static files and htmx where each kind of build needs them."""

    PLUGIN_NAME = "console-files"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        htmx = vendor_htmx(root)
        if self.target_name == "sdist":
            build_data["force_include"][str(htmx)] = HTMX.as_posix()
        elif version == "editable":
            link_into_console(root)
        else:
            for folder, inside in CONSOLE_FILES.items():
                build_data["force_include"][str(root / folder)] = inside
