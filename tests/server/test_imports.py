"""The server loads without the command line's console and plotting libraries.

``rich`` and ``matplotlib`` serve the offline commands only; a server process that
imported them would pay their start-up time and memory in every replica.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("rich", "matplotlib")


@pytest.mark.parametrize("module", ["server.app", "server.cli", "core.backbones.shipped"])
def test_importing_the_server_leaves_out_console_and_plotting(module: str) -> None:
    code = (f"import json, sys, {module}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_command_line_still_has_its_console() -> None:
    """The check above can fail: importing the commands does bring rich in."""
    code = "import sys, core.cli.commands; print('rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"
