"""Parsers of config values that the serving process needs too: addresses, statuses.

They use the standard library only (no pydantic), because the admin listener
and health probes parse the same strings at run time. Each raises ValueError
with a message that names the rejected value and the expected form.
"""

from __future__ import annotations

import ipaddress
import re

# RFC 1123 section 2.1 host name labels, plus "_" inside a label: resolvers
# accept it, and container service names such as "my_service" use it. A host
# of digits and dots only must be an IPv4 address.
_DNS_LABEL_RE = re.compile(
    r"^(?=[^.]*[A-Za-z0-9])[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z"
)
_DOTTED_DIGITS_RE = re.compile(r"^(?=.*[0-9])[0-9.]+\Z")
# The zone of a scoped IPv6 address ("fe80::1%eth0") names an interface or
# gives its index. An interface name has at most 15 bytes (IF_NAMESIZE is 16
# in <net/if.h>, with the NUL). The ipaddress module accepts any zone text
# without "%" or "/", controls and spaces included, so this check narrows it.
_ZONE_RE = re.compile(r"^[!-9;-~]{1,15}\Z")


def parse_host_port(address: str) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port` into host and port.

    The host is an IPv4 address, a bracketed IPv6 address or a DNS name
    (RFC 1123 labels); the port is 0-65535 in ASCII digits. Raises ValueError
    with the expected form when the address is not one of these.
    """
    if "://" in address:
        rest = address.partition("://")[2]
        raise ValueError(
            f'invalid address "{address}": expected "host:port" without a '
            f'scheme; write "{rest.rstrip("/")}"'
        )
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or not address[end + 1 :].startswith(":"):
            raise ValueError(f'invalid address "{address}": expected "[v6]:port"')
        host, port_text = address[1:end], address[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f'invalid IPv6 address "{host}" in "{address}"') from None
        _check_zone(host, address)
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or not host:
            raise ValueError(
                f'invalid address "{address}": expected "host:port" or "[v6]:port"'
            )
        if ":" in host:
            raise ValueError(
                f'invalid address "{address}": put an IPv6 host in brackets, '
                f'as "[{host}]:{port_text}"'
            )
        _check_host(host, address)
    # isdigit() alone accepts digits of other scripts, such as "٨٠".
    digits = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
    if not digits or int(port_text) > 65535:
        raise ValueError(f'invalid port "{port_text}" in "{address}": expected 0-65535')
    return host, int(port_text)


def _check_zone(host: str, address: str) -> None:
    """Check the zone after "%" in a scoped IPv6 address, if there is one."""
    _, percent, zone = host.partition("%")
    if percent and not _ZONE_RE.match(zone):
        escaped = address.encode("unicode_escape").decode("ascii")
        raise ValueError(
            f'invalid IPv6 zone in "{escaped}": expected an interface name or '
            'index of 1-15 visible ASCII characters without ":"'
        )


def _check_host(host: str, address: str) -> None:
    """Check an unbracketed host: an IPv4 address or an RFC 1123 DNS name."""
    if _DOTTED_DIGITS_RE.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f'invalid IPv4 address "{host}" in "{address}": expected four '
                "numbers 0-255 without leading zeros, such as 127.0.0.1"
            ) from None
        return
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
        raise ValueError(
            f'invalid host name "{host}" in "{address}": use labels of ASCII '
            'letters, digits, "_" and "-" separated by ".", each 1-63 characters '
            'long and not starting or ending with "-"'
        )


def split_endpoint_address(address: str) -> tuple[bool, str, int]:
    """Split an endpoint address into (tls, host, port).

    Accepts `host:port`, `[v6]:port`, `http://host:port` and
    `https://host:port`; the scheme decides whether the upstream speaks TLS.
    """
    tls = False
    rest = address
    if "://" in address:
        scheme, _, rest = address.partition("://")
        if scheme not in ("http", "https"):
            raise ValueError(
                f'invalid endpoint "{address}": scheme must be http or https'
            )
        tls = scheme == "https"
        rest = rest.rstrip("/")
        if "/" in rest:
            raise ValueError(f'invalid endpoint "{address}": a path is not allowed')
    host, port = parse_host_port(rest)
    if port == 0:
        raise ValueError(f'invalid endpoint "{address}": port 0 cannot be dialled')
    return tls, host, port


def parse_status_ranges(spec: str) -> tuple[tuple[int, int], ...]:
    """Parse `"200-399"` or `"200,204,300-399"` into inclusive (low, high) pairs."""
    ranges = []
    for part in spec.split(","):
        low_text, _, high_text = part.strip().partition("-")
        high_text = high_text or low_text
        if not (low_text.isdigit() and high_text.isdigit()):
            raise ValueError(
                f'invalid status range "{spec}": expected "200", "200-399" or '
                '"200,204,300-399"'
            )
        low, high = int(low_text), int(high_text)
        if not 100 <= low <= high <= 599:
            raise ValueError(
                f'invalid status range "{part.strip()}": use 100-599, low first'
            )
        ranges.append((low, high))
    return tuple(ranges)
