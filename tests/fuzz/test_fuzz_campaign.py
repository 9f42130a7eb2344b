"""The fuzz campaign in `make test`: each target of fuzz/targets.py under atheris (coverage-guided)
for a few seconds from the seed corpus in fuzz/corpus/ (new inputs go to a temporary directory;
`make fuzz` runs longer and grows the corpus in the tree), and every input kept in the corpus
(seeds, and the reproducer of any crash found, named crash-*) replayed as a plain regression
test. Inputs per target are printed (`-s` shows them) and asserted non-zero."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402

SECONDS = int(os.environ.get("WIREMESH_FUZZ_SECONDS", "6"))
pytestmark = pytest.mark.timeout(120 + 4 * SECONDS)


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_fuzzing_finds_nothing(name: str, tmp_path: Path) -> None:
    argv = [
        sys.executable, str(FUZZ / "run.py"), name,
        f"-max_total_time={SECONDS}", "-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/", str(tmp_path), str(FUZZ / "corpus" / name),
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60 + 4 * SECONDS)
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert result.returncode == 0 and not found, result.stderr[-4000:]
    runs = re.search(r"stat::number_of_executed_units: (\d+)", result.stderr)
    assert runs is not None and int(runs.group(1)) > 0, result.stderr[-2000:]
    print(f"fuzz {name}: {runs.group(1)} inputs in {SECONDS} s")


def corpus_inputs() -> list[tuple[str, Path]]:
    return [
        (name, path)
        for name in sorted(targets.TARGETS)
        for path in sorted((FUZZ / "corpus" / name).iterdir())
    ]


@pytest.mark.parametrize(
    ("name", "path"), corpus_inputs(), ids=lambda v: v.name if isinstance(v, Path) else v
)
def test_every_kept_input_is_handled(name: str, path: Path) -> None:
    targets.TARGETS[name](path.read_bytes())
