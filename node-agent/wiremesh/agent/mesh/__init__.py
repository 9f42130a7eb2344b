"""Mesh mode: the agent joins a mesh through coord.

plan.py (pure: netmap + now -> what the Engine should look like), applier.py (PlanApplier: a
plan onto the Engine, only what changed), controller.py (MeshAgent: login, netmap stream, applying
plans, the local API's requests), binding.py (magicsock as the controller's path selection, and
the local API backend), report.py (`wiremesh status`, from data alone), metrics.py, cli.py
(wiremeshd's mesh arguments and process).
"""
