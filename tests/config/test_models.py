"""Model checks added for readable errors: names, endpoints, CIDRs, routes."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from pydantic import ValidationError

from pgproxy.config.models import ClusterConfig, Config, RouteConfig, ServerConfig


def error_types(model: Any, data: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return [(e["type"], e["loc"]) for e in caught.value.errors()]


def test_trusted_proxies_parse_to_networks() -> None:
    server = ServerConfig.model_validate({"trusted_proxies": ["10.0.0.0/8", "::1/128"]})

    assert server.trusted_proxies == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    ]


def test_trusted_proxy_with_host_bits_names_the_fix() -> None:
    with pytest.raises(ValidationError, match=r'write "10\.1\.0\.0/16"'):
        ServerConfig.model_validate({"trusted_proxies": ["10.1.2.3/16"]})


def test_trusted_proxy_not_a_network() -> None:
    with pytest.raises(ValidationError, match=r'invalid CIDR "example\.com"'):
        ServerConfig.model_validate({"trusted_proxies": ["example.com"]})


def test_endpoint_error_is_on_the_item() -> None:
    types = error_types(ClusterConfig, {"endpoints": ["a:1", "b"]})

    assert (
        "value_error",
        ("endpoints", 1, "function-after[_check_endpoint_address(), str]"),
    ) in types


def test_endpoints_keep_strings_and_tables() -> None:
    cluster = ClusterConfig.model_validate(
        {"endpoints": ["a:1", {"address": "https://b:443", "weight": 3}]}
    )

    assert cluster.endpoints[0] == "a:1"
    assert [(e.address, e.weight) for e in cluster.endpoint_configs()] == [
        ("a:1", 1),
        ("https://b:443", 3),
    ]


def test_methods_are_upper_cased() -> None:
    route = RouteConfig.model_validate({"methods": ["get", "Post"], "cluster": "c"})

    assert route.methods == ["GET", "POST"]


def test_header_name_error_is_on_the_name() -> None:
    types = error_types(RouteConfig, {"headers": {"bad name": "1"}, "cluster": "c"})

    assert types == [("value_error", ("headers", "bad name", "[key]"))]


@pytest.mark.parametrize("method", ["GET\n", "GET\r", "G ET"])
def test_method_with_trailing_newline_rejected(method: str) -> None:
    with pytest.raises(ValidationError, match="invalid method"):
        RouteConfig.model_validate({"methods": [method], "cluster": "c"})


@pytest.mark.parametrize("name", ["x-a\n", "x a", "x-a:", ""])
def test_respond_header_name_must_be_a_token(name: str) -> None:
    data = {"respond": {"headers": {name: "1"}}}

    assert error_types(RouteConfig, data) == [
        ("value_error", ("respond", "headers", name, "[key]"))
    ]


@pytest.mark.parametrize("value", ["a\r\nSet-Cookie: x=1", "a\nb", "a\x00", "a\x7f"])
def test_respond_header_value_without_controls(value: str) -> None:
    data = {"respond": {"headers": {"x-a": value}}}

    assert error_types(RouteConfig, data) == [
        ("value_error", ("respond", "headers", "x-a"))
    ]


def test_respond_header_value_allows_tab_and_non_ascii() -> None:
    route = RouteConfig.model_validate(
        {"respond": {"headers": {"x-a": "caf\u00e9\tok", "x-b": ""}}}
    )

    assert route.respond is not None
    assert route.respond.headers == {"x-a": "caf\u00e9\tok", "x-b": ""}


@pytest.mark.parametrize("status", [204, 304])
def test_respond_body_with_no_content_status_rejected(status: int) -> None:
    with pytest.raises(ValidationError) as caught:
        RouteConfig.model_validate({"respond": {"status": status, "body": "x"}})
    [error] = caught.value.errors()

    assert error["type"] == "conflicting-keys"
    assert error["ctx"] is not None and error["ctx"]["key"] == "body"


@pytest.mark.parametrize(
    ("data", "code", "key"),
    [
        ({"cluster": "c", "respond": {}}, "conflicting-keys", "respond"),
        ({}, "missing-key", "cluster"),
        (
            {"cluster": "c", "path": "/a", "path_regex": "x"},
            "conflicting-keys",
            "path_regex",
        ),
        ({"cluster": "c", "strip_prefix": True}, "conflicting-keys", "strip_prefix"),
    ],
)
def test_route_checks_carry_code_and_key(
    data: dict[str, Any], code: str, key: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        RouteConfig.model_validate(data)
    [error] = caught.value.errors()

    assert error["type"] == code
    assert error["ctx"] is not None and error["ctx"]["key"] == key


@pytest.mark.parametrize("name", ["a b", "-a", "", "a/b", "a\n"])
def test_invalid_names(name: str) -> None:
    data = {"listeners": {name: {"address": "127.0.0.1:1"}}}

    with pytest.raises(ValidationError, match="invalid name"):
        Config.model_validate(data)


@pytest.mark.parametrize(
    "key", ["header:x-user", "cookie:sid", "query:k", "path", "client_ip"]
)
def test_valid_hash_keys(key: str) -> None:
    cluster = ClusterConfig.model_validate({"endpoints": ["a:1"], "hash_key": key})

    assert cluster.hash_key == key


@pytest.mark.parametrize(
    "key", ["header:", "header:a b", "ip", "cookie:a;b", "header:a\n", "path\n"]
)
def test_invalid_hash_keys(key: str) -> None:
    with pytest.raises(ValidationError, match="invalid hash_key"):
        ClusterConfig.model_validate({"endpoints": ["a:1"], "hash_key": key})


def test_strict_types() -> None:
    types = error_types(
        RouteConfig, {"cluster": "c", "retries": "2", "strip_prefix": 1}
    )

    assert sorted(types) == [
        ("bool_type", ("strip_prefix",)),
        ("int_type", ("retries",)),
    ]
