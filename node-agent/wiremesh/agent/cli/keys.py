"""`wiremesh genkey` and `wiremesh pubkey`, compatible with `wg genkey` / `wg pubkey`."""

from __future__ import annotations

import argparse
import base64
import binascii
import sys

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    genkey = subparsers.add_parser("genkey", help="print a new base64 private key")
    genkey.set_defaults(func=_genkey)
    pubkey = subparsers.add_parser("pubkey", help="read a base64 private key on stdin, print its public key")
    pubkey.set_defaults(func=_pubkey)


def _genkey(args: argparse.Namespace) -> int:
    raw = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    print(base64.b64encode(raw).decode())
    return 0


def _pubkey(args: argparse.Namespace) -> int:
    text = sys.stdin.read().strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        print("wiremesh: key is not the correct length or format", file=sys.stderr)
        return 1
    public = (
        X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    print(base64.b64encode(public).decode())
    return 0
