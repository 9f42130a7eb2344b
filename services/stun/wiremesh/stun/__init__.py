"""STUN server (RFC 8489 Binding over UDP)."""
