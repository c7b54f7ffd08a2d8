"""Address, host and port checks shared by listeners, endpoints and the admin."""

from __future__ import annotations

import pytest

from pgproxy.config.fields import parse_host_port, split_endpoint_address


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:8080", ("::1", 8080)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
        ("[fe80::1%2]:80", ("fe80::1%2", 80)),
        ("[fe80::1%" + "a" * 15 + "]:80", ("fe80::1%" + "a" * 15, 80)),
        ("localhost:65535", ("localhost", 65535)),
        ("api.example.com:443", ("api.example.com", 443)),
        ("example.com.:443", ("example.com.", 443)),
        ("a-b.c-d.example:1", ("a-b.c-d.example", 1)),
        ("xn--bcher-kva.example:80", ("xn--bcher-kva.example", 80)),
        ("0abc.example:80", ("0abc.example", 80)),
        ("a" * 63 + ".example:80", ("a" * 63 + ".example", 80)),
    ],
)
def test_valid_addresses(address: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(address) == expected


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:٨٠", 'invalid port "٨٠"'),
        ("127.0.0.1:８０", 'invalid port "８０"'),
        ("127.0.0.1:65536", 'invalid port "65536"'),
        ("127.0.0.1:" + "9" * 5000, "invalid port"),
        ("127.0.0.1:", 'invalid port ""'),
        ("256.0.0.1:80", 'invalid IPv4 address "256.0.0.1"'),
        ("1.2.3:80", 'invalid IPv4 address "1.2.3"'),
        ("010.0.0.1:80", 'invalid IPv4 address "010.0.0.1"'),
        ("123:80", 'invalid IPv4 address "123"'),
        ("..:80", 'invalid host name ".."'),
        ("_:80", 'invalid host name "_"'),
        ("-bad-.example:80", 'invalid host name "-bad-.example"'),
        ("a.-b.example:80", 'invalid host name "a.-b.example"'),
        ("example..com:80", 'invalid host name "example..com"'),
        ("bücher.example:80", 'invalid host name "bücher.example"'),
        ("*:80", 'invalid host name "*"'),
        ("a" * 64 + ".example:80", "invalid host name"),
        (".".join(["a" * 63] * 4) + ":80", "invalid host name"),
        ("[::1:80", 'expected "[v6]:port"'),
        ("[fe80::1%]:80", 'invalid IPv6 address "fe80::1%"'),
        ("[fe80::1%a b]:80", "invalid IPv6 zone"),
        ("[fe80::1%lo\n]:80", 'invalid IPv6 zone in "[fe80::1%lo\\n]:80"'),
        ("[fe80::1%lo\x1b]:80", "invalid IPv6 zone"),
        ("[fe80::1%eth\u00fc]:80", "invalid IPv6 zone"),
        ("[fe80::1%a:b]:80", "invalid IPv6 zone"),
        ("[fe80::1%" + "a" * 16 + "]:80", "invalid IPv6 zone"),
        ("::1:80", "put an IPv6 host in brackets"),
        ("localhost", 'expected "host:port"'),
    ],
)
def test_invalid_addresses(address: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_host_port(address)

    assert message in str(caught.value)


def test_scheme_hint_names_the_address_to_write() -> None:
    with pytest.raises(ValueError) as caught:
        parse_host_port("http://127.0.0.1:80/")

    message = str(caught.value)
    assert "without a scheme" in message
    assert 'write "127.0.0.1:80"' in message
    assert "brackets" not in message


def test_endpoint_host_checked_after_scheme() -> None:
    assert split_endpoint_address("https://api.example.com:443") == (
        True,
        "api.example.com",
        443,
    )
    with pytest.raises(ValueError, match='invalid host name "bad-"'):
        split_endpoint_address("http://bad-:80")


def test_endpoint_host_underscore_accepted() -> None:
    assert split_endpoint_address("my_service:8000") == (False, "my_service", 8000)
    assert split_endpoint_address("https://api_v2.internal:443") == (
        True,
        "api_v2.internal",
        443,
    )
