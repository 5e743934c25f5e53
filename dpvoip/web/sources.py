"""Who really sent a request: the peer, or behind a trusted reverse proxy the hop that proxy
saw, and whether that address may send webhooks.

``X-Forwarded-For`` is only believed when the direct peer is a configured proxy, and then
only from the right: each trusted proxy appends the address it saw, so the rightmost
address that is not a trusted proxy is the client. The leftmost value is whatever the
client chose to write, never used.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

from twisted.internet.address import IPv4Address, IPv6Address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_host(address: object) -> str:
    """The IP address of a TCP peer; '' for anything else (a unix socket's peer has none,
    and is then judged only by the proxy rules)."""
    return address.host if isinstance(address, IPv4Address | IPv6Address) else ""


def networks(texts: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


@functools.lru_cache(maxsize=1024)  # the same few proxies and Zadarma hosts, every request
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = text.strip()
    if value.startswith("[") and "]" in value:  # [v6]:port
        value = value[1:value.index("]")]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
            allowed: Sequence[Network]) -> bool:
    return any(address.version == net.version and address in net for net in allowed)


def client_address(peer: str, forwarded_for: Sequence[str], proxies: Sequence[Network]) -> str:
    """The address a request came from, as far as can be trusted ('' if unreadable)."""
    direct = _address(peer)
    if direct is None:
        return ""
    if not _within(direct, proxies):
        return str(direct)
    hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            return ""  # a garbled hop where the client should be: trust nothing
        if not _within(address, proxies):
            return str(address)
    return str(direct)  # only proxies all the way: the proxy itself sent it


def allowed(address: str, allowlist: Sequence[Network]) -> bool:
    parsed = _address(address) if address else None
    return parsed is not None and _within(parsed, allowlist)


def trusted(peer: str, proxies: Sequence[Network]) -> bool:
    """Whether the direct peer ``peer`` is one of the trusted ``proxies``."""
    direct = _address(peer) if peer else None
    return direct is not None and _within(direct, proxies)
