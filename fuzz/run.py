"""Run one fuzz target under atheris (libFuzzer), coverage-guided:

    .venv/bin/python fuzz/run.py TARGET [libFuzzer flags...] [CORPUS_DIR ...]

e.g. `fuzz/run.py policy -max_total_time=60 fuzz/corpus/policy` (new inputs it finds are added
to the first corpus directory; `make fuzz` runs every target this way). The wiremesh modules are
instrumented for coverage as they are imported. Exit status 0: nothing found in the time given.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["wiremesh"]):
    import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        raise SystemExit(f"usage: run.py TARGET [libFuzzer args]; targets: {', '.join(targets.TARGETS)}")
    target = targets.TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
