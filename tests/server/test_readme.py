"""The README's quick-start commands work against a running server, verbatim."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.server.live import LiveServer

README = Path(__file__).parents[2] / "README.md"


def _quick_start_lines() -> list[str]:
    text = README.read_text()
    block = text[text.index("## Quick start"):text.index("## Commands")]
    return [line.strip() for line in block.splitlines()
            if line.startswith((".venv/bin/python -c", "curl "))]


def test_readme_curl_examples_return_predictions(server: LiveServer, tmp_path: Path) -> None:
    assert shutil.which("curl"), "curl is needed to run the README's examples"
    lines = _quick_start_lines()
    curls = [line for line in lines if line.startswith("curl ")]
    assert len(curls) >= 2 and any("task=animal-mnist" in c for c in curls)
    printed: list[str] = []
    for line in lines:
        line = line.replace("http://127.0.0.1:8000", server.url)
        if line.startswith(".venv/bin/python"):
            line = line.replace(".venv/bin/python", sys.executable, 1)
        out = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, (line, out.stderr)
        printed += out.stdout.split()
        if line.startswith("curl "):
            answer = json.loads(out.stdout)
            task = re.search(r"task=([a-z0-9-]+)", line)
            assert task is not None
            assert answer["task"] == task.group(1), out.stdout
            assert answer["predictions"] and answer["energy"]["total_j"] > 0
            if task.group(1) == "animal-mnist" and "@animal.png" in line:
                # the task's own test image: its true class, printed by the one-liner
                assert answer["ood"] is False and answer["predictions"][0]["label"] in printed
            if task.group(1) == "animal-mnist" and "@cat.png" in line:
                assert answer["ood"] is True, out.stdout  # a photo: out of distribution
    assert any("@animal.png" in c for c in curls) and any("@cat.png" in c for c in curls)
