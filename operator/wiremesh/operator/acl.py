"""The ACL resource's pure side: which policy text a spec means, what is wrong with it (with
line and column), and the status that describes it. No Kubernetes or HTTP calls here."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from wiremesh.core.policy import Diagnostic, check_policy, check_policy_obj, run_tests
from wiremesh.core.policy.hujson import MAX_TEXT

MAX_ERRORS = 20  # status stays small however broken the policy is
MAX_MESSAGE = 500
# coord's rejection lines: "policy:3:7: error: ..." or "policy: acls[0].dst: error: ..."
_COORD_LINE = re.compile(
    r"^policy(?::(\d+):(\d+))?(?::\s*([^:\s][^:]*?))?:\s*(?:error|test failed):\s*(.*)$", re.S
)


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyProblem:
    message: str
    line: int | None = None
    col: int | None = None
    path: str = ""

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message[:MAX_MESSAGE]}
        if self.line is not None:
            out["line"] = self.line
        if self.col is not None:
            out["col"] = self.col
        if self.path:
            out["path"] = self.path
        return out

    def __str__(self) -> str:
        where = (
            f"{self.line}:{self.col}: " if self.line is not None else (f"{self.path}: " if self.path else "")
        )
        return f"{where}{self.message}"


@dataclasses.dataclass(frozen=True, slots=True)
class Checked:
    """The outcome of checking an ACL spec locally (before coord sees it)."""

    text: str  # what is sent to coord
    problems: tuple[PolicyProblem, ...]
    warnings: tuple[str, ...] = ()
    rules: int = 0
    tests: int = 0

    @property
    def valid(self) -> bool:
        return not self.problems


STRUCTURE_KEYS = ("groups", "hosts", "tagOwners", "acls", "tests")


def policy_text(spec: dict[str, Any]) -> tuple[str, bool]:
    """(the policy text to hand to coord, whether it came as text). The structured form (the
    policy's sections as YAML fields of spec) is sent as indented JSON."""
    text = spec.get("policy")
    if isinstance(text, str):
        return text, True
    structure = {k: v for k, v in spec.items() if k != "policy"}
    return json.dumps(structure, indent=2, sort_keys=True) + "\n", False


def _problem(d: Diagnostic) -> PolicyProblem:
    if d.pos is not None:
        return PolicyProblem(d.message, d.pos.line, d.pos.col, d.path)
    return PolicyProblem(d.message, path=d.path)


def check_spec(spec: dict[str, Any]) -> Checked:
    """Parse, validate and run the policy's own tests, as coord will (coord also runs the tests
    against the real nodes, which can still refuse it)."""
    text, as_text = policy_text(spec)
    if len(text.encode()) > MAX_TEXT:
        return Checked(text, (PolicyProblem(f"policy larger than {MAX_TEXT} bytes"),))
    if as_text:
        policy, diagnostics = check_policy(text)
    else:
        policy, diagnostics = check_policy_obj({k: v for k, v in spec.items() if k != "policy"})
    errors = tuple(_problem(d) for d in diagnostics if d.severity == "error")[:MAX_ERRORS]
    warnings = tuple(str(_problem(d)) for d in diagnostics if d.severity == "warning")[:MAX_ERRORS]
    if policy is None or errors:
        return Checked(text, errors or (PolicyProblem("invalid policy"),), warnings)
    failures = run_tests(policy)
    problems = tuple(
        PolicyProblem(
            f"test failed: {f.message}", f.pos.line if f.pos else None, f.pos.col if f.pos else None
        )
        for f in failures
    )[:MAX_ERRORS]
    return Checked(text, problems, warnings, rules=len(policy.rules), tests=len(policy.tests))


def parse_coord_errors(errors: list[str], detail: str = "") -> tuple[PolicyProblem, ...]:
    """coord's rejection lines as problems with line/column where coord gave them."""
    out = []
    for line in errors[:MAX_ERRORS]:
        match = _COORD_LINE.match(line.strip())
        if match is None:
            out.append(PolicyProblem(line))
            continue
        row, col, path, message = match.groups()
        failed_test = ": test failed:" in line
        out.append(
            PolicyProblem(
                ("test failed: " if failed_test else "") + message.strip(),
                int(row) if row else None,
                int(col) if col else None,
                (path or "").strip(),
            )
        )
    if not out:
        out.append(PolicyProblem(detail or "policy rejected by coord"))
    return tuple(out)


def condition(ctype: str, ok: bool, reason: str, message: str, now: str) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "lastTransitionTime": now,
    }


def merge_conditions(old: list[dict[str, Any]] | None, new: dict[str, Any]) -> list[dict[str, Any]]:
    """Replace the condition of the same type, keeping its transition time if status is unchanged."""
    out = []
    for cond in old or []:
        if not isinstance(cond, dict) or cond.get("type") == new["type"]:
            if (
                isinstance(cond, dict)
                and cond.get("status") == new["status"]
                and cond.get("lastTransitionTime")
            ):
                new = {**new, "lastTransitionTime": cond["lastTransitionTime"]}
            continue
        out.append(cond)
    out.append(new)
    return out


def invalid_status(
    problems: tuple[PolicyProblem, ...], generation: int | None, warnings: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Status fields for a rejected policy (appliedGeneration is left as it was: the previous
    policy stays in force)."""
    return {
        "valid": False,
        "errors": [p.to_status() for p in problems],
        "warnings": list(warnings),
        "observedGeneration": generation,
    }


def applied_status(checked: Checked, generation: int | None, coord_version: int) -> dict[str, Any]:
    return {
        "valid": True,
        "errors": [],
        "warnings": list(checked.warnings),
        "rules": checked.rules,
        "tests": checked.tests,
        "testsPassed": checked.tests,
        "testsSummary": f"{checked.tests}/{checked.tests}",
        "observedGeneration": generation,
        "appliedGeneration": generation,
        "coordVersion": coord_version,
    }
