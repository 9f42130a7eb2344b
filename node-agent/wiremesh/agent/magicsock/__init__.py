"""magicsock: NAT traversal and relays for the agent, around the sans-I/O path selector.

adapter.py (MagicSock, the Engine's path selection), relays.py (DERP connections), netcheck.py
(STUN, latency, port mapping), reachability.py (when to netcheck; our endpoints and home relay,
and telling coord), portmapper.py (PCP/NAT-PMP I/O over wiremesh.core.portmap), probesockets.py
(birthday probing), diagnostics.py (netcheck and ping for the local API) and filemode.py
(`python -m wiremesh.agent.magicsock CONFIG`: peers from a file, for labs).
"""

from wiremesh.agent.magicsock.adapter import MagicSock
from wiremesh.agent.magicsock.endpoint import PeerEndpoint

__all__ = ["MagicSock", "PeerEndpoint"]
