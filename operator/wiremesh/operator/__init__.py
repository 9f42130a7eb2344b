"""Kubernetes operator for MeshNode and ACL resources."""
