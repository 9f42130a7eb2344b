"""How the images are built: the Dockerfile's shape, what the build context holds, pinned dependencies.

(The images themselves are built and run in the real cluster: tests/k8s.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from wiremesh.lab import images

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_runtime_dependency_is_pinned_in_the_lock() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["postgres"]}
    pinned = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned exactly: {line}"
            pinned[_name(name)] = version
    assert wanted <= set(pinned), sorted(wanted - set(pinned))


def test_the_builder_stage_is_separate_and_the_runtime_takes_only_the_virtualenv() -> None:
    stages = re.findall(r"^FROM (\S+) AS (\w+)", DOCKERFILE, re.M)
    assert stages[0] == ("${RUST_IMAGE}", "native")  # the Rust transport kernel
    assert stages[1] == ("${BASE_IMAGE}", "builder")
    assert stages[2] == ("${BASE_IMAGE}", "runtime")
    runtime = DOCKERFILE.split("AS runtime", 1)[1].split("\nFROM ", 1)[0]
    assert re.findall(r"^COPY .*", runtime, re.M) == ["COPY --from=builder /opt/wiremesh /opt/wiremesh"]
    assert "requirements.lock" in DOCKERFILE.split("AS runtime", 1)[0]
    # The kernel reaches the runtime only inside the builder's virtualenv; it must import there.
    builder = DOCKERFILE.split("AS builder", 1)[1].split("AS runtime", 1)[0]
    assert "COPY --from=native /out/wiremesh_wgkernel.abi3.so" in builder
    assert "import wiremesh_wgkernel" in builder


def test_the_build_context_leaves_the_lab_tests_and_tools_out() -> None:
    copied = re.findall(r"^COPY (?!--from)(.*) \S+$", DOCKERFILE, re.M)
    sources = {part for line in copied for part in line.split()}
    assert sources == {
        "requirements.lock",
        "pyproject.toml",
        "README.md",
        *images.CONTEXT_TREES,
        *images.CONTEXT_FILES,
    } - {"Dockerfile"}
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :][:1] == ["*"]  # everything is excluded unless let in below
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == sources and "lab" not in allowed and "tests" not in allowed


def test_the_lab_is_a_distribution_of_its_own() -> None:
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = main["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert all(not p.startswith("lab") for p in packages)
    lab = tomllib.loads((ROOT / "lab" / "pyproject.toml").read_text())
    assert lab["project"]["name"] == "wiremesh-lab"


def test_the_image_tag_changes_with_any_source_file(tmp_path: Path) -> None:
    for name in images.CONTEXT_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    for tree in images.CONTEXT_TREES:
        (tmp_path / tree / "pkg").mkdir(parents=True)
        (tmp_path / tree / "pkg" / "a.py").write_text("x = 1\n")
    first = images.context_digest(tmp_path)
    (tmp_path / "node-agent" / "pkg" / "__pycache__").mkdir()
    (tmp_path / "node-agent" / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    assert images.context_digest(tmp_path) == first  # bytecode is not part of the build
    (tmp_path / "node-agent" / "pkg" / "a.py").write_text("x = 2\n")
    assert images.context_digest(tmp_path) != first
