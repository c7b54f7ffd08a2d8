"""pydantic models of the config file, one class per TOML table.

These models are the single source of the config's shape: the loader
validates TOML into them, `pgproxy schema` prints their JSON Schema, and
docs/configuration.md is generated from their field descriptions. Every model
forbids unknown keys, because a typo in a proxy config must fail loudly
instead of becoming a silent default. Cross-references (a route naming a
cluster) are checked later, when the graph is built.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pgproxy.config.fields import (
    AmbiguousPathName,
    EndpointAddress,
    HashKey,
    HeaderName,
    HeaderValue,
    Method,
    Network,
    ObjectName,
)
from pgproxy.config.fields import parse_host_port as parse_host_port
from pgproxy.config.fields import parse_status_ranges as parse_status_ranges
from pgproxy.config.fields import split_endpoint_address as split_endpoint_address
from pgproxy.config.units import (
    DurationSeconds,
    HeaderSizeBytes,
    PositiveDurationSeconds,
    SizeBytes,
)


class _Model(BaseModel):
    # strict: TOML has typed values, so "5" for an integer is a mistake to report,
    # not a string to coerce.
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, strict=True
    )


class TlsConfig(_Model):
    """TLS termination for a listener."""

    certificate: str = Field(
        description="Path of the PEM certificate chain. A relative path is "
        "resolved against the directory of the config file; `~` is not expanded."
    )
    private_key: str = Field(
        description="Path of the PEM private key, not encrypted. A relative path "
        "is resolved against the directory of the config file; `~` is not "
        "expanded."
    )


class ServerConfig(_Model):
    """Process-wide settings."""

    workers: int | Literal["auto"] = Field(
        default=1,
        description='Worker processes sharing each listening socket; "auto" '
        "starts one per CPU.",
    )
    drain_timeout: DurationSeconds = Field(
        default=30.0,
        description="On SIGTERM or SIGINT, the time in-flight requests may take "
        "to finish before they are cancelled and logged with the failure flag "
        'drain_timeout. "0s" cancels them at once. A reload that removes a '
        "listener lets its connections finish without this limit.",
    )
    shutdown_delay: DurationSeconds = Field(
        default=0.0,
        description="On SIGTERM or SIGINT, the time pgproxy keeps accepting and "
        "serving after admin /healthz turns 503 and before its listeners close, "
        "so that an outer load balancer polling /healthz stops sending first. "
        'The drain follows. "0s" closes the listeners at once; a second signal '
        "ends the delay and cancels the drain.",
    )
    admin: str | None = Field(
        default=None,
        description='Address of the admin listener ("host:port") serving '
        "/metrics, /healthz and /status; off when unset. Bind it to loopback.",
    )
    access_log: Literal["json", "combined", "off"] = Field(
        default="json", description="Access log format on the pgproxy.access logger."
    )
    trusted_proxies: list[Network] = Field(
        default_factory=list,
        description="CIDRs of peers whose inbound X-Forwarded-* headers are kept; "
        "from any other peer they are replaced.",
    )

    @field_validator("workers")
    @classmethod
    def _workers_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError(f'invalid workers {value}: expected 1-256 or "auto"')
        return value

    @field_validator("admin")
    @classmethod
    def _admin_address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value


class ListenerConfig(_Model):
    """One listening address and the limits it puts on downstream clients."""

    address: str = Field(
        description='"host:port" to bind, or "[v6]:port"; port 0 picks a free port.'
    )
    header_read_timeout: PositiveDurationSeconds = Field(
        default=10.0,
        description="Time a client has to send the request line and headers "
        "(408 after it).",
    )
    idle_timeout: PositiveDurationSeconds = Field(
        default=75.0,
        description="Time an idle keep-alive client connection is kept open.",
    )
    tunnel_idle_timeout: PositiveDurationSeconds = Field(
        default=3600.0,
        description="Time an upgraded connection (WebSocket) may carry no data "
        "in either direction before pgproxy closes both sides.",
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="Client connections the listener keeps open at once, in each "
        "worker process. A connection beyond it is reset as soon as it is accepted, "
        "and a warning says so at most every 10s. Unset: no limit of the "
        "listener's own. Each process also caps all its client connections at "
        "half of its open file limit less 32, and raises that limit to the hard "
        "limit at startup.",
    )
    send_timeout: PositiveDurationSeconds = Field(
        default=60.0,
        description="Time a client may go without reading while pgproxy waits "
        "to send to it (a full write buffer, or a closed connection with unsent "
        "bytes), tunnels included. pgproxy then aborts the connection and logs "
        "the request in progress with send_timeout.",
    )
    max_header_bytes: HeaderSizeBytes = Field(
        default=64 * 1024,
        description="Max size of the request line and headers (431 above it); "
        "1KiB to 1MiB. Also bounds a chunked body's framing (chunk extensions, "
        "trailer fields) beyond 32 bytes per chunk (400 above it).",
    )
    max_body_bytes: SizeBytes = Field(
        default=100 * 1024 * 1024,
        description="Max request body size (413 above it); 0 means no limit.",
    )
    reject_ambiguous_paths: list[AmbiguousPathName] = Field(
        default_factory=list,
        description="Request path spellings rejected with 400 before routing, "
        "because some upstreams read them differently from the route match: "
        '"semicolon" (`;`, `%3B`), "backslash" (`\\`, `%5C`), "escaped_slash" '
        '(`%2F`), "escaped_percent" (`%25`, for upstreams that decode twice) and '
        '"overlong_utf8" (overlong UTF-8 escapes such as `%C0%AF` for `/` and '
        "`%C0%AE` for `.`, for upstreams that decode them). Escapes match in "
        "either case; the query string is not checked.",
    )
    tls: TlsConfig | None = Field(default=None, description="TLS termination.")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_host_port(value)
        return value


class RespondConfig(_Model):
    """A fixed response sent by pgproxy itself, without an upstream."""

    status: int = Field(default=200, ge=200, le=599, description="HTTP status code.")
    body: str = Field(
        default="", description="Response body, sent as UTF-8; none with 204 or 304."
    )
    headers: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict, description="Extra response headers."
    )

    @model_validator(mode="after")
    def _no_body_without_content(self) -> RespondConfig:
        # RFC 9110 sections 15.3.5 and 15.4.5: 204 and 304 end at their head.
        # A client would read the body as the start of the next response.
        if self.body and self.status in (204, 304):
            raise PydanticCustomError(
                "conflicting-keys",
                "a {status} response has no body: remove body or change status",
                {"key": "body", "status": self.status},
            )
        return self


class RedirectConfig(_Model):
    """A redirect sent by pgproxy itself: the request's URL with parts replaced."""

    status: Literal[301, 302, 303, 307, 308] = Field(
        default=301,
        description="Redirect status: 301 or 308 moved for good, 302, 303 or 307 "
        "for now; 307 and 308 keep the method and body.",
    )
    scheme: Literal["http", "https"] | None = Field(
        default=None,
        description="Scheme of the Location; default the request's (https on a "
        "TLS listener).",
    )
    host: str | None = Field(
        default=None,
        description="Host of the Location, without a port; default the host "
        "of the request's Host header.",
    )
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port of the Location. Default: the request's port when "
        "scheme and host stay the same, otherwise none (the scheme's default). "
        "80 with http and 443 with https are left out.",
    )
    path: str | None = Field(
        default=None,
        description="Path of the Location in place of the request's; the query "
        "is kept unless strip_query is set.",
    )
    strip_query: bool = Field(
        default=False, description="Leave the request's query out of the Location."
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is not None and not _REDIRECT_HOST_RE.fullmatch(value):
            raise ValueError(
                f'invalid redirect host "{value}": use a DNS name or an IP '
                'address ("[::1]" for IPv6), without a port'
            )
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not _REDIRECT_PATH_RE.fullmatch(value):
            raise ValueError(
                f'invalid redirect path "{value}": it must start with "/" and '
                "contain only URL path characters (percent-encode the others)"
            )
        return value

    @model_validator(mode="after")
    def _changes_something(self) -> RedirectConfig:
        if self.scheme is None and self.host is None and self.port is None:
            if self.path is None:
                raise PydanticCustomError(
                    "missing-key",
                    "a redirect to the request's own URL would loop: set "
                    "scheme, host, port or path",
                    {"key": "scheme"},
                )
        return self


# RFC 3986: a reg-name of letters, digits, "-" and ".", or an IP literal.
_REDIRECT_HOST_RE: Final = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\]"
)
# RFC 3986 path-absolute: pchar and "/", with percent-encoded octets.
_REDIRECT_PATH_RE: Final = re.compile(
    r"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*"
)


class HeaderRulesConfig(_Model):
    """Changes to the header fields of a proxied request or response."""

    set: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict,
        description="Fields to send in place of every received field of the same "
        "name (names match in any case).",
    )
    add: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict,
        description="Fields to send after the received ones, which are kept.",
    )
    remove: list[HeaderName] = Field(
        default_factory=list,
        description="Names of received fields to drop (names match in any case).",
    )

    def named(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Return (key path, field name) for every name the rules contain."""
        return [
            *((("set", name), name) for name in self.set),
            *((("add", name), name) for name in self.add),
            *((("remove", i), name) for i, name in enumerate(self.remove)),
        ]


RetryCondition = Literal["connect-failure", "reset-before-response", 502, 503, 504]


class RouteConfig(_Model):
    """One routing rule: conditions on the request, then a cluster or a response."""

    name: str | None = Field(
        default=None, description='Route name in logs and metrics; default "routes[N]".'
    )
    listeners: list[str] | None = Field(
        default=None, description="Listeners this route applies to; default all."
    )
    priority: int = Field(
        default=0,
        description="Higher priority routes are tried first, before specificity "
        "ordering.",
    )
    host: str | None = Field(
        default=None,
        description='Exact host ("api.example.com") or wildcard ("*.example.com"); '
        "matched case-insensitively, port ignored.",
    )
    path: str | None = Field(default=None, description="Exact path match.")
    path_prefix: str | None = Field(
        default=None,
        description='Prefix matched on segment boundaries: "/api" matches /api, '
        "/api/ and /api/x but not /apix.",
    )
    path_regex: str | None = Field(
        default=None, description="Python regular expression searched in the path."
    )
    methods: list[Method] | None = Field(
        default=None,
        description="Allowed request methods, matched in upper case; default any.",
    )
    headers: dict[HeaderName, str] | None = Field(
        default=None,
        description="Request headers that must be present with "
        "exactly these values (names case-insensitive).",
    )
    cluster: str | None = Field(default=None, description="Cluster to proxy to.")
    redirect: RedirectConfig | None = Field(
        default=None,
        description="Redirect sent by pgproxy itself, instead of a cluster.",
    )
    respond: RespondConfig | None = Field(
        default=None, description="Fixed response instead of a cluster."
    )
    strip_prefix: bool = Field(
        default=False,
        description="Remove the matched path_prefix before forwarding.",
    )
    timeout: PositiveDurationSeconds = Field(
        default=60.0,
        description="Limit on the whole request, every attempt included (504).",
    )
    retries: int = Field(
        default=1, ge=0, le=10, description="Extra attempts, each on another endpoint."
    )
    request_headers: HeaderRulesConfig | None = Field(
        default=None,
        description="Changes to the request header fields sent upstream. Host, "
        "Via, X-Forwarded-For/Proto/Host and the framing and hop-by-hop fields "
        "are pgproxy's own and cannot be changed.",
    )
    response_headers: HeaderRulesConfig | None = Field(
        default=None,
        description="Changes to the header fields of upstream responses sent to "
        "the client; pgproxy's own error responses are left as they are. Via "
        "and the framing and hop-by-hop fields cannot be changed.",
    )
    retry_on: list[RetryCondition] = Field(
        default_factory=lambda: list[RetryCondition](["connect-failure"]),
        description='When to retry: "connect-failure", "reset-before-response", '
        "or the upstream statuses 502, 503, 504. Status retries apply only to "
        "idempotent methods or requests with an Idempotency-Key header.",
    )

    @field_validator("path", "path_prefix")
    @classmethod
    def _path_absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f'path "{value}" must start with "/"')
        return value

    @model_validator(mode="after")
    def _one_target_one_path(self) -> RouteConfig:
        # The error types double as diagnostic codes, and "key" in the context
        # names the key the problem is reported on.
        targets = [
            k
            for k in ("cluster", "respond", "redirect")
            if getattr(self, k) is not None
        ]
        if len(targets) > 1:
            raise PydanticCustomError(
                "conflicting-keys",
                'set one of "cluster", "respond" and "redirect", not {keys}',
                {"key": targets[1], "keys": " and ".join(targets)},
            )
        if not targets:
            raise PydanticCustomError(
                "missing-key",
                'a route needs a target: set "cluster", "respond" or "redirect"',
                {"key": "cluster"},
            )
        paths = [k for k in ("path", "path_prefix", "path_regex") if getattr(self, k)]
        if len(paths) > 1:
            raise PydanticCustomError(
                "conflicting-keys",
                "set at most one of path, path_prefix and path_regex, not {keys}",
                {"key": paths[1], "keys": " and ".join(paths)},
            )
        if self.strip_prefix and self.path_prefix is None:
            raise PydanticCustomError(
                "conflicting-keys",
                "strip_prefix = true needs path_prefix",
                {"key": "strip_prefix"},
            )
        for key in ("request_headers", "response_headers"):
            self._check_rules_target(key)
        return self

    def _check_rules_target(self, key: str) -> None:
        # The fields each rule names are checked with the graph (graph/
        # build_routes.py), which reports every problem, not the first.
        if getattr(self, key) is not None and self.cluster is None:
            raise PydanticCustomError(
                "conflicting-keys",
                "{key} applies to proxied requests only, and this route "
                "answers itself (respond.headers sets the fields of a fixed "
                "response)",
                {"key": key},
            )


class EndpointConfig(_Model):
    """An endpoint with a weight; a plain string endpoint has weight 1."""

    address: str = Field(
        description='"host:port", "[v6]:port" or "https://host:port" for upstream TLS.'
    )
    weight: int = Field(default=1, ge=1, le=1000, description="Relative weight.")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        split_endpoint_address(value)
        return value


class HealthCheckConfig(_Model):
    """Active health check: a probe sent to every endpoint on an interval."""

    type: Literal["http", "tcp"] = Field(
        default="http", description='"http" sends a request; "tcp" only connects.'
    )
    path: str = Field(default="/", description="Request path of an HTTP probe.")
    method: Literal["GET", "HEAD"] = Field(default="GET", description="Probe method.")
    host: str | None = Field(
        default=None, description="Host header of an HTTP probe; default the endpoint."
    )
    expect_status: str = Field(
        default="200-399",
        description='Statuses that count as healthy: "200", "200-399" or '
        '"200,204,300-399".',
    )
    interval: PositiveDurationSeconds = Field(
        default=5.0, description="Time between probes."
    )
    timeout: PositiveDurationSeconds = Field(
        default=2.0, description="Limit on one probe; must be below interval."
    )
    healthy_threshold: int = Field(
        default=2, ge=1, le=100, description="Consecutive successes to mark healthy."
    )
    unhealthy_threshold: int = Field(
        default=3, ge=1, le=100, description="Consecutive failures to mark unhealthy."
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f'path "{value}" must start with "/"')
        return value

    @field_validator("expect_status")
    @classmethod
    def _expect_status(cls, value: str) -> str:
        parse_status_ranges(value)
        return value


class OutlierDetectionConfig(_Model):
    """Passive health: eject endpoints that fail real traffic."""

    enabled: bool = Field(default=True, description="Turn passive ejection on or off.")
    consecutive_failures: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Failed requests in a row that eject an endpoint: connect "
        "failures and timeouts, resets, invalid responses, response header "
        "timeouts, and 502-504 responses.",
    )
    base_ejection_time: PositiveDurationSeconds = Field(
        default=30.0,
        description="First ejection time; each further ejection adds this again.",
    )
    max_ejection_time: PositiveDurationSeconds = Field(
        default=300.0, description="Cap on the ejection time."
    )
    max_ejection_percent: int = Field(
        default=50,
        ge=0,
        le=100,
        description="Never eject more than this share of the cluster's endpoints.",
    )


class ClusterConfig(_Model):
    """A set of endpoints serving the same content, and how to use them."""

    endpoints: list[EndpointAddress | EndpointConfig] = Field(
        description='The upstream servers, each "host:port", "[v6]:port", '
        '"https://host:port" (TLS to the upstream) or a table '
        '{ address = "host:port", weight = N }.'
    )
    balancer: Literal["round_robin", "consistent_hash", "least_request", "random"] = (
        Field(default="round_robin", description="Endpoint selection algorithm.")
    )
    hash_key: HashKey | None = Field(
        default=None,
        description="Key of consistent_hash: header:NAME, cookie:NAME, query:NAME, "
        "path or client_ip.",
    )
    connect_timeout: PositiveDurationSeconds = Field(
        default=5.0, description="Limit on opening a connection to an endpoint."
    )
    response_header_timeout: PositiveDurationSeconds = Field(
        default=60.0,
        description="Limit between sending the request and receiving the "
        "response headers (504).",
    )
    pool_idle_timeout: PositiveDurationSeconds = Field(
        default=4.0,
        description="Idle pooled connections are closed after this; keep it below "
        "the upstream's own keep-alive timeout.",
    )
    max_idle_connections: int = Field(
        default=32, ge=0, le=10_000, description="Idle pooled connections per endpoint."
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Max connections to each endpoint, in each process, that "
        "are carrying a request or opening; idle pooled connections do not "
        "count. A request that finds every available endpoint at its limit "
        "waits, first come first served, for up to connect_timeout, then gets "
        "503 with the flag upstream_overflow. No limit when unset.",
    )
    max_response_header_bytes: HeaderSizeBytes = Field(
        default=64 * 1024,
        description="Max size of an upstream response head, counted from the first "
        "byte of the status line through the empty line that ends the header "
        "fields, every CRLF included. A larger head is answered with 502 and its "
        "connection closed. 1KiB to 1MiB.",
    )
    tls_ca_file: str | None = Field(
        default=None,
        description="Path of a PEM file of CA certificates that verify the "
        "certificates of https:// endpoints, in place of the system trust store. "
        "A relative path is resolved against the directory of the config file; "
        "`~` is not expanded.",
    )
    host_header: str = Field(
        default="preserve",
        description='Host header sent upstream: "preserve" (the client\'s), '
        '"endpoint" (the endpoint address) or a literal host.',
    )
    when_all_unhealthy: Literal["fail", "route_to_all"] = Field(
        default="fail",
        description='With no healthy endpoint: "fail" responds 503 with Retry-After; '
        '"route_to_all" ignores health.',
    )
    health_check: HealthCheckConfig | None = Field(
        default=None, description="Active health check; none when unset."
    )
    outlier_detection: OutlierDetectionConfig = Field(
        default_factory=OutlierDetectionConfig,
        description="Passive health checking, on by default.",
    )

    def endpoint_configs(self) -> list[EndpointConfig]:
        """Return every endpoint as an EndpointConfig, strings given weight 1."""
        return [
            EndpointConfig(address=item) if isinstance(item, str) else item
            for item in self.endpoints
        ]


class Config(_Model):
    """The whole data plane: listeners, routes and clusters."""

    server: ServerConfig = Field(
        default_factory=ServerConfig, description="Process-wide settings."
    )
    listeners: dict[ObjectName, ListenerConfig] = Field(
        description="Listeners by name, as [listeners.NAME] tables.",
        json_schema_extra={"additionalProperties": False},
    )
    routes: list[RouteConfig] = Field(
        default_factory=list, description="Routing rules; the most specific match wins."
    )
    clusters: dict[ObjectName, ClusterConfig] = Field(
        default_factory=dict,
        description="Upstream clusters by name, as [clusters.NAME] tables.",
        json_schema_extra={"additionalProperties": False},
    )
