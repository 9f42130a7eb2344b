# One Dockerfile, one target per component: docker build --target coord -t wiremesh/coord .
# The whole distribution is installed once in `base`; each target only differs in its
# entry point, user and the system packages it needs at run time.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY services services
COPY node-agent node-agent
COPY operator operator
COPY lab lab
RUN pip install '.[postgres]' && rm -rf /src
RUN useradd --system --uid 10001 --home-dir /var/lib/wiremesh --create-home wiremesh
WORKDIR /var/lib/wiremesh

FROM base AS coord
USER 10001
EXPOSE 8080
ENTRYPOINT ["wiremesh-coord"]
CMD ["--listen", "0.0.0.0:8080", "--state-dir", "/var/lib/wiremesh"]

FROM base AS keys
USER 10001
EXPOSE 8081
ENTRYPOINT ["wiremesh-keys"]
CMD ["--listen", "0.0.0.0:8081", "--state-dir", "/var/lib/wiremesh"]

FROM base AS stun
USER 10001
EXPOSE 3478/udp
ENTRYPOINT ["wiremesh-stun"]

FROM base AS derp
USER 10001
EXPOSE 3340
ENTRYPOINT ["wiremesh-derp"]

FROM base AS operator
USER 10001
ENTRYPOINT ["wiremesh-operator"]

# The agent needs NET_ADMIN and /dev/net/tun; it runs as root inside its pod.
FROM base AS agent
RUN apt-get update && apt-get install -y --no-install-recommends iproute2 nftables \
    && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["wiremeshd"]
