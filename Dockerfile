# Images of streamcast (CONTRACT §9, docs/deploy.md). `make docker` builds `serving` and
# `training`; docker-compose.yml builds those and `tracking`.
#
#   protos    generates the gRPC stubs: grpcio-tools is a dev-only dependency and stays here
#   serving   ONNX Runtime with CUDA 13 + cuDNN 9, no torch, non-root; the server on 0.0.0.0
#   training  torch (CPU wheels) for `python -m training fit | ensure-production | promote`
#   tracking  an MLflow tracking server with the PostgreSQL driver (docker-compose.yml)
#
# Versions come from requirements/*.txt pinned by requirements/constraints.txt, as in `make install`;
# the few names pinned inline here repeat the constraints (tests/unit/test_dockerfile.py checks).

# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS protos
WORKDIR /src
COPY requirements/constraints.txt requirements/
RUN pip install --no-cache-dir -c requirements/constraints.txt grpcio-tools==1.81.1
COPY protos/ protos/
COPY serving/__init__.py serving/protogen.py serving/
RUN python -m serving.protogen

# ---------------------------------------------------------------------------------------------
# The CUDA 13 runtime with cuDNN 9 is what onnxruntime-gpu 1.31 loads for its CUDA execution
# provider; without a GPU (or with --device cpu) the same image runs on the CPU provider.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS serving
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Python: Ubuntu 24.04's own 3.12 (security updates from Ubuntu, no third-party package source);
# the serving pins have 3.12 wheels, and tests/packaging serves from a 3.12 venv built from them.
# Apt packages are not pinned to versions: the archive drops superseded ones, so an exact pin
# breaks the build at the next security update; the base image's tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY requirements/serving.txt requirements/constraints.txt /tmp/requirements/
# The serving image must not contain torch (CONTRACT §2): the build fails if anything pulled it in.
RUN pip install --no-cache-dir -r /tmp/requirements/serving.txt -c /tmp/requirements/constraints.txt \
    && python -c "import importlib.util, sys; sys.exit('torch is in the serving image' if importlib.util.find_spec('torch') else 0)" \
    && rm -rf /tmp/requirements
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin streamcast
WORKDIR /app
COPY serving/ serving/
# Prebuilt stubs and no protos/ directory: serving/proto.py has nothing to check them against.
COPY --from=protos /src/serving/_proto/ serving/_proto/
USER 10001
EXPOSE 50051 9100
# Asks grpc.health.v1 (SERVING only once the model is loaded and warmed up); the first download
# from a registry can take a while, hence the start period.
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-m", "serving.healthcheck", "--target", "127.0.0.1:50051", "--timeout", "5"]
# 0.0.0.0 here only: in a container the port is reached through the container's interface. The
# server's own default stays 127.0.0.1. Flags given as CMD (or Kubernetes `args`) come after these,
# so they can override them.
ENTRYPOINT ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9100"]
CMD ["--model-uri", "models:/forecaster@production", "--device", "auto"]

# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS training
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    GIT_PYTHON_REFRESH=quiet
WORKDIR /app
COPY requirements/ requirements/
# torch's CPU build (constraints: torch==2.13.0+cpu) comes from PyTorch's own wheel index, which
# PyPI does not mirror; training on 2 cores takes minutes, no GPU needed (README "Benchmarks").
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements/training.txt -c requirements/constraints.txt
COPY configs/ configs/
COPY training/ training/
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin streamcast
USER 10001
# The code stays read-only in /app; runs write (a local sqlite store, temp files) in the home.
WORKDIR /home/streamcast
ENTRYPOINT ["python", "-m", "training"]
CMD ["ensure-production", "--config", "/app/configs/elecdemand.yaml"]

# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS tracking
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GIT_PYTHON_REFRESH=quiet
COPY requirements/tracking.txt requirements/constraints.txt /tmp/requirements/
RUN pip install --no-cache-dir -r /tmp/requirements/tracking.txt -c /tmp/requirements/constraints.txt \
    && rm -rf /tmp/requirements
# /mlartifacts is created here owned by the server's user, so a fresh named volume mounted
# there inherits that owner and the server can write artifacts into it.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin streamcast \
    && install -d -o 10001 -g 10001 /mlartifacts
USER 10001
WORKDIR /home/streamcast
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
