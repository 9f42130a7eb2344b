"""The agent <-> coord control channel: Noise IK over HTTP, sans-I/O (see channel.py)."""
