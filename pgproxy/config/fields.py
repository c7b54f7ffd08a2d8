"""Field types and parsers for config values: names, addresses, CIDRs, keys.

Each check raises ValueError with a message that names the rejected value and
the expected form, because the loader shows that message to the user as it
is. The Annotated types keep the plain Python type (`str`, a network) so that
code reading a Config gets ordinary values.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from pgproxy.config.parsing import parse_host_port as parse_host_port
from pgproxy.config.parsing import parse_status_ranges as parse_status_ranges
from pgproxy.config.parsing import (
    split_endpoint_address as split_endpoint_address,
)

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_NAME_RE = re.compile(_NAME_PATTERN)
# RFC 9110 section 5.6.2 token. \Z, not $, which also matches before a final
# newline: "x-a\n" would pass and reach a response head.
_METHOD_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_HEADER_NAME_RE = _METHOD_RE
_HASH_KEY_PATTERN = (
    r"^(header:[!#$%&'*+.^_`|~0-9A-Za-z-]+|cookie:[^\s;=]+|query:[^\s&=]+"
    r"|path|client_ip)$"
)
# The patterns end in $ for the JSON Schema. In Python, $ also matches before
# a final newline, so the checks below use fullmatch.
_HASH_KEY_RE = re.compile(_HASH_KEY_PATTERN)


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f'invalid name "{name}": use letters, digits, "_", "." and "-", '
            "starting with a letter or digit"
        )
    return name


def _check_endpoint_address(address: str) -> str:
    split_endpoint_address(address)
    return address


def _parse_network(value: object) -> object:
    """Parse a CIDR string strictly, so "10.0.0.1/8" is rejected, not widened."""
    if not isinstance(value, str):
        return value
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as error:
        if "has host bits set" in str(error):
            wider = ipaddress.ip_network(value, strict=False)
            raise ValueError(
                f'invalid CIDR "{value}": host bits are set; write "{wider}"'
            ) from None
        raise ValueError(
            f'invalid CIDR "{value}": expected a network such as "10.0.0.0/8" '
            'or "2001:db8::/32"'
        ) from None


def _check_hash_key(key: str) -> str:
    if not _HASH_KEY_RE.fullmatch(key):
        raise ValueError(
            f'invalid hash_key "{key}": expected header:NAME, cookie:NAME, '
            "query:NAME, path or client_ip"
        )
    return key


def _check_method(method: str) -> str:
    if not _METHOD_RE.match(method):
        raise ValueError(
            f'invalid method "{method}": expected one token such as "GET" or "POST"'
        )
    return method.upper()


def _check_header_value(value: str) -> str:
    # RFC 9110 section 5.5: CR, LF, NUL and the other controls but HTAB are
    # invalid in a field value; CR LF would end the field and start another.
    if any(char != "\t" and (char < " " or char == "\x7f") for char in value):
        raise ValueError(
            f"invalid header value {value!r}: control characters such as CR, LF "
            "and NUL are not allowed (RFC 9110 section 5.5)"
        )
    return value


def _check_header_name(name: str) -> str:
    if not _HEADER_NAME_RE.match(name):
        raise ValueError(
            f'invalid header name "{name}": use letters, digits and "-" '
            "(an RFC 9110 token)"
        )
    return name


# Names of listeners and clusters. The JSON Schema keeps the pattern so that
# editors flag a bad name; the validator gives the readable message.
ObjectName = Annotated[
    str,
    AfterValidator(_check_name),
    Field(json_schema_extra={"pattern": _NAME_PATTERN}),
]
EndpointAddress = Annotated[str, AfterValidator(_check_endpoint_address)]
Method = Annotated[str, AfterValidator(_check_method)]
HeaderName = Annotated[str, AfterValidator(_check_header_name)]
HeaderValue = Annotated[str, AfterValidator(_check_header_value)]
Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_parse_network)
]


HashKey = Annotated[
    str,
    AfterValidator(_check_hash_key),
    Field(json_schema_extra={"pattern": _HASH_KEY_PATTERN}),
]

# Names of the path spellings that `reject_ambiguous_paths` can list;
# pgproxy.graph.paths.AMBIGUOUS_NAMES lists the same names.
AmbiguousPathName = Literal[
    "semicolon", "backslash", "escaped_slash", "escaped_percent", "overlong_utf8"
]
