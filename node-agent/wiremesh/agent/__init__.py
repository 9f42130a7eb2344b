"""The node agent (wiremeshd) and the wiremesh CLI."""
