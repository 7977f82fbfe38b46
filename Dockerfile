# syntax=docker/dockerfile:1
# coinfer image for the Docker testbed (docker-compose.yml): the edge server and the UE client, CPU torch.
#   docker compose up --build --scale ue=4      (or UE_REPLICAS=4 docker compose up --build)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# iproute2: `tc` for the UE's uplink shaping (the ue service has cap NET_ADMIN).
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 \
    && rm -rf /var/lib/apt/lists/*

# CPU builds of torch and torchvision from the PyTorch CPU index: a Docker host has no local wheel, PyPI's
# torch is a CUDA build, and PyPI's torchvision (CUDA) fails to load its ops on a CPU torch. Pinned as in
# pyproject.toml, so `pip install .` below keeps them (2.13.0+cpu satisfies ==2.13.0).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 torchvision==0.28.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY modelgraph/ modelgraph/
COPY profiler/ profiler/
COPY partitioner/ partitioner/
COPY ue_client/ ue_client/
COPY edge_server/ edge_server/
COPY testbed/ testbed/
RUN --mount=type=cache,target=/root/.cache/pip pip install . \
    && python -c "import torch; assert not torch.version.cuda, 'a CUDA torch was pulled in'"

COPY --chmod=755 testbed/docker/ue-entrypoint.sh /usr/local/bin/ue-entrypoint.sh
RUN mkdir -p /results
EXPOSE 50051

# The edge server by default; the ue service overrides the entrypoint.
CMD ["coinfer-edge", "serve", "--host", "0.0.0.0", "--port", "50051", "--insecure"]
