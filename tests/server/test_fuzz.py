"""Property-based requests over the whole OpenAPI document against a real server.

Schemathesis (its command line, as an operator would run it) generates valid and invalid
requests for every operation: boundary values, then random ones, then sequences that
follow the document's links. Every check runs against each answer: never a 5xx, a status
the document declares, a body matching its schema, headers and auth as declared. Bounded
(examples per operation, a fixed seed) so that a run takes the same time every time;
loopback only.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.live import LiveServer

KEY = "fuzz-operator-key"
MAX_EXAMPLES = 20
NOT_APPLICABLE = ["positive_data_acceptance"]
"""Every other check runs. This one expects schema-valid requests to succeed, but a schema
cannot say "a decodable image", "a real task archive" or "a task that exists": random bytes
and names that fit it are rightly refused with 404, 415 or 422."""


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # Its own server: the fuzzer deletes tasks and sends hostile bodies.
    live = LiveServer(tmp_path_factory.mktemp("fuzz"), api_key=KEY, max_body_bytes=2_000_000,
                      max_image_pixels=1_000_000)
    live.start()
    try:
        yield live
    finally:
        live.stop()


def test_every_operation_keeps_its_contract(fuzz_server: LiveServer, tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [str(cli), "run", f"{fuzz_server.url}/openapi.json", "--header",
         f"Authorization: Bearer {KEY}", "--exclude-checks", ",".join(NOT_APPLICABLE),
         "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--continue-on-failure",
         "--request-timeout", "60", "--no-color", "--report", "junit",
         "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-2000:]
    summary = {line.split(":")[0].strip(): line.split(":", 1)[1].strip()
               for line in run.stdout.splitlines() if line.strip().startswith(("Selected:",
                                                                               "Tested:"))}
    assert summary["Tested"] == summary["Selected"].split("/")[1], summary  # every operation
    generated = re.search(r"^\s*(\d+) generated", run.stdout, re.MULTILINE)
    assert generated and int(generated.group(1)) >= 300, run.stdout[-3000:]
