"""The shared library: sans-I/O protocols (Noise, WireGuard, disco, STUN, DERP, control),
the policy engine, and the message models that components exchange."""
