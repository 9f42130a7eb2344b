"""The service shell: what every wiremesh service runs around its core (FastAPI and uvicorn,
NATS, SQLAlchemy engines, structured logs). I/O lives here, never in wiremesh.core."""
