"""Where a fetched URL may lead: its host resolved once, internal addresses refused, the checked address returned.

An allow-listed host name is not enough: it may resolve (or be re-pointed by DNS) to 127.0.0.1, to a cloud
metadata service (169.254.169.254) or into a private network. So the name is resolved here, every address it
resolves to must be public, and the caller connects to the address that was checked (no second resolution that
DNS could answer differently), keeping the name for the Host header and TLS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The well-known NAT64 prefix (RFC 6052): its last 32 bits are an IPv4 address a NAT64 gateway would reach.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UnsafeAddress(ValueError):
    """The host resolves to an address the server must not connect to (or does not resolve)."""


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in the resolver's order (an IP literal resolves to itself)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def internal_kind(address: str) -> str | None:
    """What makes `address` internal ("loopback", "private", ...), or None for a public address. IPv6 forms that
    carry an IPv4 address (IPv4-mapped, 6to4, NAT64) are judged by that address as well."""
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is not part of the address
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d (the IPv6 form itself lies in reserved ::/8)
            candidates = [ip.ipv4_mapped]
        if ip.sixtofour is not None:
            candidates.append(ip.sixtofour)
        if ip in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    checks = (
        ("loopback", lambda a: a.is_loopback),
        ("unspecified", lambda a: a.is_unspecified),
        ("link-local", lambda a: a.is_link_local),
        ("multicast", lambda a: a.is_multicast),
        ("reserved", lambda a: a.is_reserved),
        ("private", lambda a: a.is_private),
        ("not globally reachable", lambda a: not a.is_global),
    )
    for kind, test in checks:  # the most telling name first, whichever form carries it
        if any(test(candidate) for candidate in candidates):
            return kind
    return None


async def checked_address(host: str, port: int, allow_internal: bool) -> str:
    """The address to connect to for `host`: its first resolved address, once every address it resolves to has
    passed (any internal one refuses the host, so a name cannot pick between a public and an internal answer).
    `allow_internal` lets internal addresses through (an explicit setting; listing a host is not enough)."""
    try:
        addresses = await resolve_host(host, port)
    except (OSError, UnicodeError) as exc:
        raise UnsafeAddress(f"the image host {host} does not resolve ({exc})") from None
    if not addresses:
        raise UnsafeAddress(f"the image host {host} does not resolve")
    if not allow_internal:
        for address in addresses:
            kind = internal_kind(address)
            if kind is not None:
                raise UnsafeAddress(f"the image host {host} resolves to {address}, a {kind} address")
    return addresses[0]
