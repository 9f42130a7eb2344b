"""`python -m wiremesh.agent.magicsock CONFIG.json`: an Engine and a MagicSock whose peers come
from a file instead of coord (labs, tests, benchmarks).

CONFIG: {"private_key", "disco_private_key" (base64), "tun", "addresses": [...], "listen_port",
"mtu", "derp_map", "socket", "peers": [{"name", "node_key", "disco_key", "allowed_ips",
"home_region", "endpoints": ["ip:port"]}], "birthday_sockets", "birthday_spray", "netmap_dir"}.
With "netmap_dir", agents publish their endpoints and home region there and read their peers'
(a stand-in for coord's endpoint updates and netmap). The local API serves status, netcheck and
ping.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import threading
from typing import Any

from wiremesh.agent.engine import Engine
from wiremesh.agent.localapi import LocalAPIServer
from wiremesh.agent.magicsock import diagnostics
from wiremesh.agent.magicsock.adapter import MagicSock
from wiremesh.core.disco import DiscoKey, Endpoint
from wiremesh.core.magicsock import PeerInfo
from wiremesh.core.wireguard import PeerConfig


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


class FileModeBackend:
    """The local API backend of file mode: status, netcheck and ping."""

    def __init__(
        self, engine: Engine, magicsock: MagicSock, addresses: list[str], names: dict[str, bytes]
    ) -> None:
        self.engine = engine
        self.magicsock = magicsock
        self.addresses = addresses
        self.names = names  # peer name -> node key

    def status(self) -> dict[str, Any]:
        engine_status = self.engine.status()
        ms = self.magicsock.status()
        by_key = {_b64(k): n for n, k in self.names.items()}
        for key, peer in ms["peers"].items():
            peer["name"] = by_key.get(key)
            live = engine_status["peers"].get(key, {})
            for field in ("rx_bytes", "tx_bytes", "last_handshake_seconds_ago"):
                peer[field] = live.get(field)
        return {"addresses": self.addresses, "magicsock": ms, "engine_drops": engine_status["drops"]}

    def ip(self) -> list[str]:
        return [a.split("/")[0] for a in self.addresses]

    async def up(self) -> dict[str, Any]:
        return {"ok": True}

    async def down(self) -> dict[str, Any]:
        raise diagnostics.Refused(409, "file mode has no down")

    async def logout(self) -> dict[str, Any]:
        raise diagnostics.Refused(409, "file mode has no logout")

    async def netcheck(self) -> dict[str, Any]:
        return await diagnostics.netcheck(self.magicsock)

    async def ping(self, peer: str) -> dict[str, Any]:
        return await diagnostics.ping(self.magicsock, peer, self.names)


def _published_path(directory: str, node_key: bytes) -> str:
    return os.path.join(directory, base64.urlsafe_b64encode(node_key).decode() + ".json")


def _publish(directory: str, node_key: bytes, endpoints: tuple[str, ...], home: int | None) -> None:
    path = _published_path(directory, node_key)
    with open(path + ".tmp", "w") as f:
        json.dump({"endpoints": list(endpoints), "home_region": home}, f)
    os.replace(path + ".tmp", path)


def _read_published(directory: str, node_key: bytes) -> dict[str, Any]:
    try:
        with open(_published_path(directory, node_key)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def main(argv: list[str] | None = None) -> int:
    """`python -m wiremesh.agent.magicsock CONFIG.json`: Engine + MagicSock with static peers.

    CONFIG: {"private_key", "disco_private_key" (base64), "tun", "addresses": [...],
    "listen_port", "derp_map", "socket", "peers": [{"name", "node_key", "disco_key",
    "allowed_ips", "home_region", "endpoints": ["ip:port"]}], "birthday_sockets", "birthday_spray",
    "netmap_dir"}. With "netmap_dir", agents publish their endpoints and home region there and
    read their peers' (a stand-in for coord's endpoint updates and netmap).
    """
    parser = argparse.ArgumentParser(prog="python -m wiremesh.agent.magicsock")
    parser.add_argument("config")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    with open(args.config) as f:
        cfg = json.load(f)
    private = base64.b64decode(cfg["private_key"])
    engine = Engine(
        private, cfg["tun"], listen_port=int(cfg.get("listen_port", 0)), mtu=int(cfg.get("mtu", 1280))
    )
    ms = MagicSock(
        engine,
        private,
        cfg.get("derp_map"),
        disco_key=DiscoKey(base64.b64decode(cfg["disco_private_key"])),
        birthday_sockets=cfg.get("birthday_sockets"),
        birthday_spray=cfg.get("birthday_spray"),
    )
    engine.paths = ms
    engine.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        engine.set_addresses(cfg.get("addresses", []))
        engine.set_routes(["100.64.0.0/10"])
        ms.start()
        names: dict[str, bytes] = {}
        for p in cfg.get("peers", []):
            names[p.get("name") or p["node_key"]] = base64.b64decode(p["node_key"])
        netmap_dir = cfg.get("netmap_dir")

        def peer_infos() -> list[PeerInfo]:
            infos = []
            for p in cfg.get("peers", []):
                key = base64.b64decode(p["node_key"])
                texts, home = list(p.get("endpoints", [])), p.get("home_region")
                if netmap_dir:
                    published = _read_published(netmap_dir, key)
                    texts = texts + list(published.get("endpoints", []))
                    home = published.get("home_region", home)
                eps = []
                for text in texts:
                    host, _, port = str(text).rpartition(":")
                    if port.isdigit():
                        eps.append(Endpoint((host.strip("[]"), int(port))))
                infos.append(PeerInfo(key, base64.b64decode(p["disco_key"]), tuple(eps), home))
            return infos

        if netmap_dir:
            # Stand-in for coord: publish our endpoints and home region where peers read them.
            ms.reachability.on_change = lambda eps, home: _publish(netmap_dir, ms.node_key, eps, home)
            ms.reachability.report_now()
        endpoints = ms.set_peers(peer_infos())
        engine.set_peers(
            [
                PeerConfig(
                    public_key=base64.b64decode(p["node_key"]),
                    allowed_ips=tuple(p["allowed_ips"]),
                    endpoint=endpoints[base64.b64decode(p["node_key"])],
                    roam=False,
                )
                for p in cfg.get("peers", [])
            ]
        )
        backend = FileModeBackend(engine, ms, list(cfg.get("addresses", [])), names)

        async def serve() -> None:
            server = LocalAPIServer(backend, cfg["socket"])
            await server.start()
            try:
                last: list[PeerInfo] = []
                while not stop.is_set():
                    await asyncio.sleep(0.2)
                    if netmap_dir:
                        infos = peer_infos()
                        if infos != last:
                            last = infos
                            ms.set_peers(infos)
            finally:
                await server.close()

        asyncio.run(serve())
    finally:
        ms.stop()
        engine.stop()
    return 0
