"""`wiremesh policy check FILE`: validate a policy file and run its `tests`, offline."""

from __future__ import annotations

import argparse
import sys

from wiremesh.core.policy import check_policy, run_tests
from wiremesh.core.policy.hujson import MAX_TEXT

EXIT_OK = 0
EXIT_INVALID = 1  # errors in the policy, or a failing test
EXIT_UNREADABLE = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = subparsers.add_parser("policy", help="work with access-control policy files")
    sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    sub.required = True
    check = sub.add_parser(
        "check",
        help="validate a policy file (HuJSON, Tailscale's format) and run its tests",
        description="Exit 0 when the policy is valid and every test passes; otherwise print each "
        "error (FILE:LINE:COL: ...) or failing test and exit 1.",
    )
    check.add_argument("file", metavar="FILE", help="policy file, or - for standard input")
    check.add_argument("-q", "--quiet", action="store_true", help="print nothing on success, no warnings")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    name = "<stdin>" if args.file == "-" else args.file
    try:
        if args.file == "-":
            text = sys.stdin.buffer.read(MAX_TEXT + 1)
        else:
            with open(args.file, "rb") as f:
                text = f.read(MAX_TEXT + 1)
    except OSError as exc:
        print(f"wiremesh: cannot read {name}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    policy, diagnostics = check_policy(text)
    for d in diagnostics:
        if d.severity == "error" or not args.quiet:
            print(d.format(name), file=sys.stderr)
    if policy is None:
        errors = sum(1 for d in diagnostics if d.severity == "error")
        print(f"{name}: invalid policy ({errors} error{'s' if errors != 1 else ''})", file=sys.stderr)
        return EXIT_INVALID
    failures = run_tests(policy)
    for failure in failures:
        print(failure.format(name), file=sys.stderr)
    if failures:
        failed = len({f.index for f in failures})
        print(f"{name}: {failed} of {len(policy.tests)} tests failed", file=sys.stderr)
        return EXIT_INVALID
    if not args.quiet:
        print(f"{name}: valid; {len(policy.rules)} rules; {len(policy.tests)} tests passed")
    return EXIT_OK
