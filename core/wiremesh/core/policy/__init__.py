"""The access-control policy engine: Tailscale's policy file format (HuJSON), validated,
evaluated directly, and compiled per node into visible peers and inbound filter rules.

Typical use (coord):

    policy = parse_policy(text)          # PolicyError with line:col diagnostics if invalid
    failures = run_tests(policy)         # the policy's own `tests`
    compiler = PolicyCompiler(policy, nodes)
    changed = compiler.add_node(node)    # node ids whose netmap must be re-sent
    compiler.compiled(node_id).peers / .packet_filter()
"""

from wiremesh.core.policy.approve import auto_approved
from wiremesh.core.policy.compile import CompiledNode, PolicyCompiler
from wiremesh.core.policy.evaluate import Evaluator, TestFailure, evaluate, run_tests
from wiremesh.core.policy.hujson import HujsonError, Pos
from wiremesh.core.policy.model import (
    Diagnostic,
    FilterRule,
    Policy,
    PolicyError,
    PolicyNode,
    allow_all_policy,
)
from wiremesh.core.policy.parse import check_policy, check_policy_obj, parse_policy, policy_from_obj

__all__ = [
    "CompiledNode",
    "Diagnostic",
    "Evaluator",
    "FilterRule",
    "HujsonError",
    "Policy",
    "PolicyCompiler",
    "PolicyError",
    "PolicyNode",
    "Pos",
    "TestFailure",
    "allow_all_policy",
    "auto_approved",
    "check_policy",
    "check_policy_obj",
    "evaluate",
    "parse_policy",
    "policy_from_obj",
    "run_tests",
]
