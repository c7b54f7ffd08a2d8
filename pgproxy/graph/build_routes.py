"""Routes built from their config tables, with the checks that span routes.

Part of `pgproxy.graph.build`: each function adds its problems to the
Collector of the build; the diagnostic codes are listed in that module.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from pgproxy.config.models import (
    Config,
    HeaderRulesConfig,
    RedirectConfig,
    RouteConfig,
)
from pgproxy.config.sourcemap import format_key_path
from pgproxy.graph.collector import Collector, did_you_mean
from pgproxy.graph.patterns import backtracking_warning, compile_path_regex
from pgproxy.graph.settings import (
    HeaderRulesSettings,
    RedirectSettings,
    RespondSettings,
    settings_from_config,
)
from pgproxy.graph.shadowing import find_shadowed, shadow_reason
from pgproxy.graph.types import PathKind, Route

# Fields that pgproxy writes itself from the framing, the connection and its
# own policies. A rule changing them would break the framing, or make them
# contradict what pgproxy did.
_OWN_FIELDS: Final = frozenset(
    {
        "connection",
        "content-length",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "via",
    }
)
_OWN_REQUEST_FIELDS: Final = _OWN_FIELDS | {
    "host",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
}

# Lower-case DNS labels (underscores allowed, as in service names), with an
# optional leading "*." for a wildcard.
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST_RE = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


def build_route(
    config: Config, index: int, route_config: RouteConfig, found: Collector
) -> Route:
    key = f"routes[{index}]"
    listeners = _route_listeners(config, key, route_config, found)
    if route_config.cluster is not None and route_config.cluster not in config.clusters:
        found.error(
            f"{key}.cluster",
            "unknown-cluster",
            f'cluster "{route_config.cluster}" is not defined',
            did_you_mean(route_config.cluster, config.clusters),
        )
    path_kind, path, pattern = _route_path(key, route_config, found)
    if route_config.redirect is not None:
        _check_redirect_loop(config, key, route_config.redirect, listeners, found)
    _check_header_rules(f"{key}.request_headers", route_config.request_headers, found)
    _check_header_rules(f"{key}.response_headers", route_config.response_headers, found)
    return Route(
        name=route_config.name if route_config.name is not None else key,
        index=index,
        listeners=listeners,
        priority=route_config.priority,
        host=_route_host(key, route_config.host, found),
        path_kind=path_kind,
        path=path,
        path_regex=pattern,
        methods=frozenset(route_config.methods) if route_config.methods else None,
        headers=tuple(
            (name.lower(), value)
            for name, value in (route_config.headers or {}).items()
        ),
        cluster=route_config.cluster,
        respond=(
            None
            if route_config.respond is None
            else settings_from_config(RespondSettings, route_config.respond)
        ),
        strip_prefix=route_config.strip_prefix,
        timeout=route_config.timeout,
        retries=route_config.retries,
        retry_on=frozenset(route_config.retry_on),
        request_headers=_header_rules(route_config.request_headers),
        response_headers=_header_rules(route_config.response_headers),
        redirect=(
            None
            if route_config.redirect is None
            else settings_from_config(RedirectSettings, route_config.redirect)
        ),
    )


def _check_redirect_loop(
    config: Config,
    key: str,
    redirect: RedirectConfig,
    listeners: frozenset[str],
    found: Collector,
) -> None:
    if redirect.host is not None or redirect.port is not None or redirect.path:
        return
    schemes = {
        "https" if config.listeners[name].tls is not None else "http"
        for name in listeners
    }
    if schemes == {redirect.scheme}:
        found.warning(
            f"{key}.redirect",
            "redirect-loop",
            f"every listener of this route already serves {redirect.scheme}, so "
            "the redirect sends clients to the URL they requested",
            "set host, port or path, or limit the route to the other listeners",
        )


def _check_header_rules(
    key: str, rules: HeaderRulesConfig | None, found: Collector
) -> None:
    """Report every rule on a field that pgproxy writes itself, and every conflict."""
    if rules is None:
        return
    own_fields = _OWN_REQUEST_FIELDS if key.endswith("request_headers") else _OWN_FIELDS
    removed = {name.lower() for name in rules.remove}
    for path, name in rules.named():
        where = f"{key}.{format_key_path(path)}"
        lower = name.lower()
        if lower in own_fields:
            hint = (
                "the cluster's host_header chooses the Host sent upstream"
                if lower == "host"
                else None
            )
            found.error(
                where,
                "invalid-value",
                f'pgproxy writes the "{name}" field itself, so a rule cannot change it',
                hint,
            )
        elif lower in removed and path[0] != "remove":
            found.error(
                where,
                "conflicting-keys",
                f'"{name}" is both removed and sent: drop it from remove or '
                f"from {path[0]}",
            )


def _header_rules(rules: HeaderRulesConfig | None) -> HeaderRulesSettings | None:
    if rules is None or not (rules.set or rules.add or rules.remove):
        return None
    return settings_from_config(HeaderRulesSettings, rules)


def _route_listeners(
    config: Config, key: str, route_config: RouteConfig, found: Collector
) -> frozenset[str]:
    if route_config.listeners is None:
        return frozenset(config.listeners)
    for i, name in enumerate(route_config.listeners):
        if name not in config.listeners:
            found.error(
                f"{key}.listeners[{i}]",
                "unknown-listener",
                f'listener "{name}" is not defined',
                did_you_mean(name, config.listeners),
            )
    return frozenset(
        name for name in route_config.listeners if name in config.listeners
    )


def _route_host(key: str, host: str | None, found: Collector) -> str | None:
    if host is None:
        return None
    normal = host.lower().rstrip(".")
    if normal.startswith("[") and normal.endswith("]"):
        try:
            ipaddress.IPv6Address(normal[1:-1])
        except ValueError:
            pass
        else:
            return normal
    # fullmatch: $ alone would accept a newline at the end.
    if not _HOST_RE.fullmatch(normal):
        found.error(
            f"{key}.host",
            "invalid-host",
            f'invalid host "{host}": expected a name such as "api.example.com" '
            'or a wildcard such as "*.example.com", without port or path',
            "leave host unset to match any host",
        )
    return normal


def _route_path(
    key: str, route_config: RouteConfig, found: Collector
) -> tuple[PathKind, str, re.Pattern[str] | None]:
    if route_config.path is not None:
        return "exact", route_config.path, None
    if route_config.path_prefix is not None:
        return "prefix", route_config.path_prefix, None
    if route_config.path_regex is None:
        return "any", "", None
    regex = route_config.path_regex
    try:
        pattern = compile_path_regex(regex)
    except ValueError as error:
        found.error(f"{key}.path_regex", "invalid-regex", str(error))
        return "regex", regex, None
    warning = backtracking_warning(regex)
    if warning is not None:
        found.warning(f"{key}.path_regex", "regex-backtracking", *warning)
    return "regex", regex, pattern


def check_route_names(routes: list[Route], found: Collector) -> None:
    first_index: dict[str, int] = {}
    for route in routes:
        if route.name in first_index:
            found.error(
                f"routes[{route.index}].name",
                "duplicate-route-name",
                f'route name "{route.name}" is already used by '
                f"routes[{first_index[route.name]}]",
                "route names label logs and metrics, so each must be unique",
            )
        else:
            first_index[route.name] = route.index


def check_shadowed(routes: list[Route], found: Collector) -> None:
    for shadowed, winner in find_shadowed(routes):
        found.warning(
            f"routes[{shadowed.index}]",
            "shadowed-route",
            f'route "{shadowed.name}" can never match: route "{winner.name}" '
            f"(routes[{winner.index}]) matches every request it matches and "
            f"ranks first because {shadow_reason(winner, shadowed)}",
            "remove the route, or make it more specific or give it a higher priority",
        )
