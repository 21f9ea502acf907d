# syntax=docker/dockerfile:1
#
# One image for the four aimesh services; the command picks which one runs:
#
#   docker build -t aimesh .
#   docker run aimesh aimesh-ingest      # (the default command)
#   docker run aimesh aimesh-worker
#   docker run aimesh aimesh-notifier
#   docker run aimesh aimesh-gateway     # the HTTP/JSON gateway and its web page
#
# Configuration is the AIMESH_* environment (src/aimesh/settings.py). Inside a container the gRPC servers must
# bind all interfaces: AIMESH_INGEST_ADDRESS=0.0.0.0:50051, AIMESH_NOTIFIER_ADDRESS=0.0.0.0:50052, and the gateway
# AIMESH_GATEWAY_ADDRESS=0.0.0.0:8080.
# Triton and the models' Python packages run in their own container (docker-compose.yml), not in this image.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: generate the protobuf code, then install the project into /opt/aimesh ----------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# The code generators (protoc from grpcio-tools, the mypy-protobuf plugins) at the versions the dev extra pins,
# in a virtual environment of their own that never reaches the runtime image.
COPY pyproject.toml ./
RUN python -c "import tomllib; dev = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev']; reqs = [r for r in dev if r.split('==')[0] in ('grpcio-tools', 'mypy-protobuf')]; assert len(reqs) == 2, reqs; print(*reqs, sep=chr(10))" > /tmp/codegen.txt \
 && python -m venv /opt/codegen \
 && /opt/codegen/bin/pip install -r /tmp/codegen.txt

COPY protos/ protos/
COPY scripts/gen_protos.py scripts/
COPY src/ src/
COPY services/ services/
# The checkout's own generated code (if any) is replaced by a fresh one; then the project (not editable) goes
# into a pip-less virtual environment, which is all the runtime stage copies.
RUN rm -rf src/aimesh/v1 \
 && /opt/codegen/bin/python scripts/gen_protos.py \
 && python -m venv --without-pip /opt/aimesh \
 && pip --python /opt/aimesh/bin/python install . \
 && /opt/aimesh/bin/python -c "import aimesh.v1.task_pb2, aimesh.ingest.__main__, aimesh.worker.__main__, aimesh.notifier.__main__, aimesh.gateway.__main__"

# --- runtime --------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

ENV PATH=/opt/aimesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 aimesh \
 && useradd --system --uid 10001 --gid aimesh --home-dir /home/aimesh --create-home --shell /usr/sbin/nologin aimesh \
 && install -d -o aimesh -g aimesh /var/lib/aimesh/notifier

COPY --from=build /opt/aimesh /opt/aimesh

USER 10001:10001
WORKDIR /home/aimesh

# 50051: ingest gRPC, 50052: notifier gRPC, 8080: the gateway's HTTP (the worker serves nothing).
EXPOSE 50051 50052 8080

# No entrypoint wrapper: the command is the console script of the service, which runs as PID 1 and drains on
# SIGTERM itself (compose adds an init process with `init: true` to reap children).
CMD ["aimesh-ingest"]
