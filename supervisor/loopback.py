"""libtorrent settings for a swarm on 127.0.0.1 alone: the demo's, the tests' and the benchmarks'.

No DHT, LSD, UPnP or NAT-PMP (nothing leaves the machine), and no uTP: libtorrent's uTP on
loopback runs at about a tenth of TCP's speed. A module of its own, importing nothing, so that a
benchmark that measures its own memory can take it without loading the demo or libtorrent.
"""

from __future__ import annotations

LOOPBACK_SETTINGS: dict[str, str | int | bool] = {
    "listen_interfaces": "127.0.0.1:0",
    "enable_dht": False,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    "enable_incoming_utp": False,
    "enable_outgoing_utp": False,
    "allow_multiple_connections_per_ip": True,
}
