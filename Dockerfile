# One Dockerfile, one target per component: docker build --target coord -t wiremesh/coord .
#
# `builder` turns the source into a wheel with a throwaway build environment and installs it,
# with its dependencies pinned by requirements.lock, into the virtualenv /opt/wiremesh. Each
# component's image is `runtime` (the base image plus that virtualenv only: no compiler, no build
# backend, no sources, no test lab) with its own entry point and user.
#
# BASE_IMAGE is any Debian-like image with python3 (3.11+) and its venv module. The default is the
# public python image; the test suite builds on a Debian root file system of its own, made with
# mmdebstrap (lab/wiremesh/lab/images.py). PIP_INDEX_URL and PIP_CERT pass a package index and
# its CA through to pip in the builder stage only; they are not kept in any image.
#
# `native` builds the WireGuard transport kernel (native/wgkernel, Rust) that the agent's data path
# uses when it is there. RUST_IMAGE is any image with cargo and a C compiler (ring's C and assembly
# parts need one); the default is the public rust image. The test suite passes a Debian image with
# gcc and mounts this machine's Rust toolchain at RUSTUP_HOME and CARGO_HOME/bin. PyO3 needs no
# Python here: the module is built for the stable ABI (abi3, Python 3.11 and later).
ARG BASE_IMAGE=python:3.11-slim
ARG RUST_IMAGE=rust:1-slim-bookworm

FROM ${RUST_IMAGE} AS native
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH \
    PYO3_NO_PYTHON=1 CARGO_TERM_PROGRESS_WHEN=never
COPY native/wgkernel/Cargo.toml native/wgkernel/Cargo.lock /src/wgkernel/
COPY native/wgkernel/src /src/wgkernel/src
RUN cd /src/wgkernel && cargo build --release --locked --quiet \
    && install -D -m 0755 target/release/libwiremesh_wgkernel.so /out/wiremesh_wgkernel.abi3.so

FROM ${BASE_IMAGE} AS builder
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/build && /opt/build/bin/pip install "hatchling==1.33.0" \
    && python3 -m venv /opt/wiremesh
# Dependencies first: this layer is reused for as long as the lock does not change.
COPY requirements.lock /src/requirements.lock
RUN /opt/wiremesh/bin/pip install -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY core /src/core
COPY shell /src/shell
COPY services /src/services
COPY node-agent /src/node-agent
COPY operator /src/operator
COPY --from=native /out/wiremesh_wgkernel.abi3.so /src/native/
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation -w /src/dist /src \
    && /opt/wiremesh/bin/pip install -c /src/requirements.lock /src/dist/wiremesh-*.whl \
    && cp /src/native/wiremesh_wgkernel.abi3.so \
        "$(/opt/wiremesh/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/" \
    && /opt/wiremesh/bin/python -c 'import wiremesh_wgkernel' \
    && { /opt/wiremesh/bin/pip uninstall -y pip setuptools >/dev/null 2>&1 || true; }

FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/wiremesh/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=builder /opt/wiremesh /opt/wiremesh
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/wiremesh --create-home wiremesh
WORKDIR /var/lib/wiremesh

FROM runtime AS coord
USER 10001
EXPOSE 8080
ENTRYPOINT ["wiremesh-coord"]
CMD ["--listen", "0.0.0.0:8080", "--state-dir", "/var/lib/wiremesh"]

FROM runtime AS keys
USER 10001
EXPOSE 8081
ENTRYPOINT ["wiremesh-keys"]
CMD ["--listen", "0.0.0.0:8081", "--state-dir", "/var/lib/wiremesh"]

FROM runtime AS stun
USER 10001
EXPOSE 3478/udp
ENTRYPOINT ["wiremesh-stun"]

FROM runtime AS derp
USER 10001
EXPOSE 3340
ENTRYPOINT ["wiremesh-derp"]

FROM runtime AS operator
USER 10001
ENTRYPOINT ["wiremesh-operator"]

# The agent needs NET_ADMIN and /dev/net/tun; it runs as root inside its pod. nft programs a
# subnet router's masquerade and MSS clamping (node-agent/wiremesh/agent/subnetrouter.py).
FROM runtime AS agent
RUN command -v nft >/dev/null || { apt-get update && apt-get install -y --no-install-recommends nftables \
    && rm -rf /var/lib/apt/lists/*; }
ENTRYPOINT ["wiremeshd"]
