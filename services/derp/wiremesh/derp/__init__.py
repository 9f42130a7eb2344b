"""DERP relay (Tailscale DERP v2 wire protocol)."""
