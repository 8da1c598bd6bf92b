# syntax=docker/dockerfile:1
# A hospital: `fedmusk client` (the site daemon: Flower SuperNode + fedmusk's ClientApp), with CUDA torch.
#
#   docker build -f deploy/docker/hospital.Dockerfile -t fedmusk-hospital .            # from the repository root
#   docker run -d --gpus all --shm-size 1g --name fedmusk-client --user "$(stat -c %u:%g /etc/fedmusk/bundle/site.key)" \
#       -v /data/fedmusk-site:/site:ro -v /data/fedmusk-site/.fedmusk:/site/.fedmusk \
#       -v /etc/fedmusk/bundle:/secrets:ro -v /models/musk:/models/musk:ro \
#       -e FEDMUSK_SITE_NAME=hospital-a -e FEDMUSK_SUPERLINK=fl.consortium.example.org:9092 fedmusk-hospital
#
# Base image: python:3.11-slim-bookworm, not nvidia/cuda or pytorch/pytorch, on purpose.
#   - PyTorch's CUDA wheels carry their own CUDA runtime, cuBLAS, cuDNN and NCCL (the nvidia-* wheels torch depends
#     on); a CUDA base image would ship a second, unused copy (several GB) whose version must also match torch's.
#     All a container needs from the host is the NVIDIA driver, which the NVIDIA Container Toolkit mounts in
#     (`--gpus all`, or the compose GPU override), driven by NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES.
#   - Ubuntu 22.04 (the nvidia/cuda base) has no released Python 3.11 package; pytorch/pytorch images bring conda
#     and their own Python. fedmusk is tested on CPython 3.11, the same interpreter the coordinator image runs.
# CUDA build: torch 2.13.0 for CUDA 13.0 (cu130, the build PyPI serves for Linux x86_64: its requirements name the
# nvidia-*-cu13 wheels). It needs an NVIDIA driver of the 580 series or newer on the host (`nvidia-smi`). For an
# older driver build with another PyTorch index that publishes 2.13.0, e.g. --build-arg TORCH_INDEX=.../whl/cu128.
# Without a GPU the image still runs (torch falls back to the CPU); a CPU-only site can use the coordinator's
# CPU build instead: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment in /opt/fedmusk/venv, from wheels only (the slim image has no compiler) ----------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PREFER_BINARY=1
RUN python -m venv /opt/fedmusk/venv
ENV PATH=/opt/fedmusk/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0
COPY pyproject.toml README.md /src/fedmusk/
COPY src /src/fedmusk/src
RUN pip install /src/fedmusk \
    && python -c "import torch, fedmusk; assert torch.__version__.startswith('2.13.0'), torch.__version__"
COPY configs /opt/fedmusk/venv/share/fedmusk/configs

# --- runtime ------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG FEDMUSK_UID=10001
ARG FEDMUSK_GID=10001
RUN groupadd --system --gid ${FEDMUSK_GID} fedmusk \
    && useradd --system --uid ${FEDMUSK_UID} --gid fedmusk --home-dir /home/fedmusk --create-home \
       --shell /usr/sbin/nologin fedmusk \
    && mkdir -p /site /secrets /models
COPY --from=build /opt/fedmusk/venv /opt/fedmusk/venv

# FEDMUSK_SITE / FEDMUSK_CA / FEDMUSK_KEY are `fedmusk client`'s own variables, pointing at the mounts below;
# FEDMUSK_SITE_NAME and FEDMUSK_SUPERLINK are this hospital's and must be given at `docker run` (or in compose).
# HOME and FLWR_HOME: where the SuperNode unpacks each run's app description; not under /site.
# USER/LOGNAME: libraries that ask for the user name (MLflow, torch) get one even when the container runs under
# another uid than the image's (compose's `user:`, to match the owner of bind-mounted key files).
ENV PATH=/opt/fedmusk/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    USER=fedmusk \
    LOGNAME=fedmusk \
    HOME=/home/fedmusk \
    FLWR_HOME=/home/fedmusk/.flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    RAY_USAGE_STATS_ENABLED=0 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    FEDMUSK_SITE=/site \
    FEDMUSK_CA=/secrets/ca.crt \
    FEDMUSK_KEY=/secrets/site.key

USER fedmusk:fedmusk
WORKDIR /home/fedmusk
# /site: the site folder, mounted read-only. /site/.fedmusk: mount the site's .fedmusk folder over it read-write (a
# second bind mount; create the folder on the host first, `fedmusk prepare` does): the tile cache, the audit log
# and the local log, the only things the daemon writes. /secrets: ca.crt + site.key (read-only; site.key mode 0600
# and owned by the uid the container runs as). The model files, when the federation uses them, under /models.
VOLUME ["/site", "/secrets"]

# No port: a hospital only connects out, to the coordinator. The SuperNode's runtime port (9094) is on 127.0.0.1
# inside the container. `docker stop` sends SIGTERM: the daemon stops its SuperNode and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fedmusk", "client"]
