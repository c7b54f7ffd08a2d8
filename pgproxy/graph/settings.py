"""Plain settings of a built graph: what the data plane reads from the config.

The pydantic models in `pgproxy.config.models` validate a file; these frozen
dataclasses carry the validated values into the serving process. They import
nothing but the standard library, so a process that serves a graph never
imports pydantic (about 13 MiB of resident memory per process), and a graph
pickles and unpickles without the config models. Field names and units match
the models' (durations in float seconds, sizes in bytes);
`settings_from_config` copies them, and a test checks that every field here
exists on its model. It also makes the file paths absolute, so the serving
processes never depend on their working directory.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os.path
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Process-wide settings from `[server]`."""

    workers: int | Literal["auto"]
    drain_timeout: float
    shutdown_delay: float
    admin: str | None
    access_log: Literal["json", "combined", "off"]
    trusted_proxies: tuple[IPNetwork, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Certificate and key of a TLS listener."""

    certificate: str
    private_key: str

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """A listener's address and the limits it puts on downstream clients."""

    address: str
    header_read_timeout: float
    idle_timeout: float
    tunnel_idle_timeout: float
    max_connections: int | None
    send_timeout: float
    max_header_bytes: int
    max_body_bytes: int
    # Names from pgproxy.graph.paths.AMBIGUOUS_NAMES; empty forwards all.
    reject_ambiguous_paths: tuple[str, ...]
    tls: TlsSettings | None

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


@dataclass(frozen=True, slots=True)
class RespondSettings:
    """A fixed response that pgproxy sends itself."""

    status: int
    body: str
    headers: tuple[tuple[str, str], ...]

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


@dataclass(frozen=True, slots=True)
class RedirectSettings:
    """A redirect that pgproxy sends itself; None keeps the request's part."""

    status: int
    scheme: str | None
    host: str | None
    port: int | None
    path: str | None
    strip_query: bool

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


@dataclass(frozen=True, slots=True)
class HeaderRulesSettings:
    """A route's changes to the header fields of a request or a response."""

    set: tuple[tuple[str, str], ...]
    add: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


@dataclass(frozen=True, slots=True)
class HealthCheckSettings:
    """An active health check of a cluster's endpoints."""

    type: Literal["http", "tcp"]
    path: str
    method: Literal["GET", "HEAD"]
    host: str | None
    expect_status: str
    interval: float
    timeout: float
    healthy_threshold: int
    unhealthy_threshold: int

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


# Thresholds of one probe each, for endpoints of clusters without a check:
# passive ejection alone decides their health.
DEFAULT_HEALTH_CHECK = HealthCheckSettings(
    type="http",
    path="/",
    method="GET",
    host=None,
    expect_status="200-399",
    interval=5.0,
    timeout=2.0,
    healthy_threshold=1,
    unhealthy_threshold=1,
)


@dataclass(frozen=True, slots=True)
class OutlierDetectionSettings:
    """Passive health: when real traffic ejects an endpoint, and for how long."""

    enabled: bool
    consecutive_failures: int
    base_ejection_time: float
    max_ejection_time: float
    max_ejection_percent: int

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """A cluster's balancer, timeouts, pool limits and health settings."""

    balancer: Literal["round_robin", "consistent_hash", "least_request", "random"]
    hash_key: str | None
    connect_timeout: float
    response_header_timeout: float
    pool_idle_timeout: float
    max_idle_connections: int
    max_connections: int | None
    max_response_header_bytes: int
    tls_ca_file: str | None
    host_header: str
    when_all_unhealthy: Literal["fail", "route_to_all"]
    health_check: HealthCheckSettings | None
    outlier_detection: OutlierDetectionSettings

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


_S = TypeVar("_S")


def reduce_dataclass(instance: object) -> tuple[Any, ...]:
    """Return the pickle recipe of a dataclass instance: its class and fields.

    mypyc compiles the graph's classes, which have no instance __dict__ or
    __slots__ for pickle's default to use, so each class's __reduce__ calls
    this: unpickling calls the class with the fields in order.
    """
    cls = type(instance)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    return (cls, tuple(getattr(instance, field.name) for field in fields))


# Settings classes whose values are themselves settings, by field name.
_NESTED: dict[str, type[Any]] = {
    "tls": TlsSettings,
    "health_check": HealthCheckSettings,
    "outlier_detection": OutlierDetectionSettings,
}


# Fields whose value is the path of a file that pgproxy reads.
PATH_FIELDS: Final = frozenset({"certificate", "private_key", "tls_ca_file"})


def resolve_config_path(path: str, config_dir: str) -> str:
    """Join a relative `path` to `config_dir`, the directory of the config file.

    An absolute path is returned unchanged. The process's working directory
    plays no part. "~" is not expanded: "~/cert.pem" names a directory called
    "~" next to the config. ".." and symbolic links are left to the kernel to
    resolve when the file is opened.
    """
    return os.path.join(config_dir, path)


def settings_from_config(
    cls: type[_S], model: Any, config_dir: str | None = None
) -> _S:
    """Copy the fields of `cls` from a config model of the same table.

    Lists become tuples and dicts become tuples of pairs, so settings stay
    immutable; nested tables become their settings class. The paths in
    PATH_FIELDS are resolved against `config_dir` (see resolve_config_path);
    None leaves them as written, for settings that come from no file.
    """
    values: dict[str, object] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(model, field.name)
        if field.name in _NESTED and value is not None:
            value = settings_from_config(_NESTED[field.name], value, config_dir)
        elif field.name in PATH_FIELDS and isinstance(value, str) and config_dir:
            value = resolve_config_path(value, config_dir)
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, dict):
            value = tuple(value.items())
        values[field.name] = value
    return cls(**values)
