"""Config reload: build the new graph fully, then swap it in one step.

Invariants:
- Nothing of the running state changes until the new config has loaded,
  validated and built, and every new listener is bound. A config error or a
  bind failure keeps the running config and is logged in one line with every
  diagnostic.
- The swap (`RunningState.install`) is synchronous, so no request gets half
  of it. A request keeps the graph it started with, and later requests use
  the new one.
- Health state carries over for endpoints whose (cluster, address) both
  graphs have, and so do their pools. Removed endpoints' pools drain: idle
  connections close, active ones finish.
- A listener is kept when its name and configured address (and TLS) are the
  same, even when other settings change, so its open connections survive.
  A kept TLS listener loads its certificate and key files again, so files
  renewed in place serve new connections after the reload.
- An upgraded connection (WebSocket) survives when a route of the same name
  still sends to the same cluster and its endpoint is still in that cluster.
- Reloads run one at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio

from pgproxy.errors import ConfigError
from pgproxy.graph.settings import ServerSettings
from pgproxy.graph.types import Graph, Listener, LoadedGraph
from pgproxy.health.state import HealthTable
from pgproxy.server.listeners import BindError, check_ca_files
from pgproxy.server.loading import decode_loaded, load_config_async

logger = logging.getLogger(__name__)

EndpointKey = tuple[str, str]  # cluster, address


@dataclass(frozen=True)
class ReloadPlan:
    """The changes between two graphs, computed without I/O."""

    added_listeners: tuple[Listener, ...]
    removed_listeners: tuple[str, ...]
    kept_listeners: tuple[str, ...]
    added_endpoints: frozenset[EndpointKey]
    removed_endpoints: frozenset[EndpointKey]
    kept_endpoints: frozenset[EndpointKey]
    # (route name, cluster) pairs present in both graphs.
    kept_routes: frozenset[tuple[str, str | None]]
    # Settings that only take effect after a restart, as "[server] key" strings.
    restart_required: tuple[str, ...] = ()

    def tunnel_survives(self, route: str, cluster: str, endpoint: str) -> bool:
        """Return whether an upgraded connection may stay open after the swap."""
        return (route, cluster) in self.kept_routes and (
            cluster,
            endpoint,
        ) in self.kept_endpoints

    def summary(self) -> str:
        """Describe the changes in a few words for the reload log line."""
        parts = [
            f"listeners +{len(self.added_listeners)} -{len(self.removed_listeners)}",
            f"endpoints +{len(self.added_endpoints)} -{len(self.removed_endpoints)}",
        ]
        return ", ".join(parts)


def plan_reload(
    old: Graph, new: Graph, started: ServerSettings | None = None
) -> ReloadPlan:
    """Compare two graphs and return what a reload has to change.

    `started` contains the `[server]` settings the process started with,
    `old.server` by default. A reload does not apply `workers` or `admin`,
    so the new values are compared with those.
    """
    added, removed, kept = [], [], []
    for name, listener in new.listeners.items():
        previous = old.listeners.get(name)
        if previous is not None and _same_socket(previous, listener):
            kept.append(name)
        else:
            added.append(listener)
            if previous is not None:
                removed.append(name)
    removed.extend(name for name in old.listeners if name not in new.listeners)

    old_endpoints = _endpoint_keys(old)
    new_endpoints = _endpoint_keys(new)
    old_routes = {(route.name, route.cluster) for route in old.routes}
    new_routes = {(route.name, route.cluster) for route in new.routes}
    return ReloadPlan(
        added_listeners=tuple(added),
        removed_listeners=tuple(removed),
        kept_listeners=tuple(kept),
        added_endpoints=frozenset(new_endpoints - old_endpoints),
        removed_endpoints=frozenset(old_endpoints - new_endpoints),
        kept_endpoints=frozenset(old_endpoints & new_endpoints),
        kept_routes=frozenset(old_routes & new_routes),
        restart_required=_restart_required(started or old.server, new.server),
    )


def kept_tls_listeners(new: Graph, plan: ReloadPlan) -> tuple[Listener, ...]:
    """Return the TLS listeners of `new` that the reload keeps.

    Their certificate and key files are loaded again, because renewals
    (certbot, cert-manager) usually replace the files under the same names.
    """
    listeners = (new.listeners[name] for name in plan.kept_listeners)
    return tuple(item for item in listeners if item.settings.tls is not None)


def _same_socket(old: Listener, new: Listener) -> bool:
    before, after = old.settings, new.settings
    return before.address == after.address and before.tls == after.tls


def _endpoint_keys(graph: Graph) -> set[EndpointKey]:
    return {
        (name, endpoint.address)
        for name, cluster in graph.clusters.items()
        for endpoint in cluster.endpoints
    }


def _restart_required(started: ServerSettings, new: ServerSettings) -> tuple[str, ...]:
    changed = []
    for key in ("workers", "admin"):
        if getattr(started, key) != getattr(new, key):
            changed.append(f"[server] {key}")
    return tuple(changed)


class RunningState(Protocol):
    """The serving process, as a reload uses it."""

    @property
    def graph(self) -> Graph:
        """The graph new requests use."""
        ...

    @property
    def health(self) -> HealthTable:
        """The health table of the graph in force."""
        ...

    def check_certificates(self, listeners: tuple[Listener, ...]) -> None:
        """Load the TLS files of kept `listeners`, for `install` to put in use.

        Raises BindError, changing nothing, when a file cannot be loaded.
        """
        ...

    async def open_listeners(self, listeners: tuple[Listener, ...]) -> None:
        """Bind and start accepting on `listeners`.

        Raises OSError after closing any of them it had bound, so a failed
        reload leaves no new listener behind.
        """
        ...

    def install(
        self, loaded: LoadedGraph, health: HealthTable, plan: ReloadPlan
    ) -> None:
        """Make `loaded.graph` and `health` the ones new requests use, at once."""
        ...

    def retire(self, plan: ReloadPlan) -> None:
        """Start closing what the new graph dropped, without waiting for it.

        Removed listeners stop accepting and drain their connections, removed
        endpoints' pools close idle connections, and upgraded connections for
        which `plan.tunnel_survives` is false are closed.
        """
        ...


@dataclass
class ReloadHistory:
    """The config in force and the outcome of the last reload, for /status."""

    config_path: str
    config_hash: str
    loaded_at: float = field(default_factory=time.time)  # Unix time
    last_attempt_at: float | None = None
    last_outcome: str | None = None  # "success" | "failure"
    last_error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def record(self, outcome: str, config_hash: str | None, error: str | None) -> None:
        """Record one reload attempt."""
        now = time.time()
        self.last_attempt_at = now
        self.last_outcome = outcome
        self.last_error = error
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if config_hash is not None:
            self.config_hash = config_hash
            self.loaded_at = now

    def as_dict(self) -> dict[str, object]:
        """Return the history as JSON-serialisable values."""
        return {
            "file": self.config_path,
            "hash": self.config_hash,
            "loaded_at": self.loaded_at,
            "last_reload": {
                "at": self.last_attempt_at,
                "outcome": self.last_outcome,
                "error": self.last_error,
            },
            "reloads": dict(self.counts),
        }


@dataclass(frozen=True)
class ReloadOutcome:
    """Result of one reload: the new hash, or the error that kept the old one."""

    ok: bool
    config_hash: str | None
    error: str | None
    plan: ReloadPlan | None = None


def describe_config_error(path: str, error: ConfigError) -> str:
    """Return one line with the count of diagnostics and each one rendered."""
    count = len(error.diagnostics)
    rendered = "; ".join(item.render() for item in error.diagnostics)
    noun = "problem" if count == 1 else "problems"
    return f"{path} has {count} {noun}: {rendered or error}"


class Reloader:
    """Reloads the config file of a running state, one reload at a time.

    With `log_outcome` false the outcome is logged at DEBUG only, for worker
    processes whose supervisor logs it once for all of them.
    """

    def __init__(
        self,
        path: str | Path,
        state: RunningState,
        history: ReloadHistory,
        *,
        log_outcome: bool = True,
    ) -> None:
        self.path = str(path)
        self._state = state
        self.history = history
        self._level = logging.INFO if log_outcome else logging.DEBUG
        self._started = state.graph.server
        self._lock = anyio.Lock()
        # Set once the listeners close for the drain. A reload after that
        # would open the listeners it adds, and the draining service closes
        # every connection they accept without a response.
        self.stopped = False

    def __repr__(self) -> str:
        return f"<Reloader {self.path} hash={self.history.config_hash[:12]}>"

    def stop(self) -> None:
        """Ignore every later reload, because the listeners are closing."""
        self.stopped = True

    async def reload(
        self, trigger: str = "SIGHUP", *, payload: bytes | None = None
    ) -> ReloadOutcome:
        """Load the file again and swap it in; keep the running config on error.

        With `payload` (a loader's pickled output), that graph is installed
        instead of the file's: a worker installs what its supervisor loaded.
        """
        async with self._lock:
            if self.stopped:
                message = "pgproxy is draining"
                logger.info("%s ignored: %s", trigger, message)
                return ReloadOutcome(False, None, message)
            outcome = await self._reload(trigger, payload)
        self.history.record(
            "success" if outcome.ok else "failure", outcome.config_hash, outcome.error
        )
        return outcome

    async def _reload(self, trigger: str, payload: bytes | None) -> ReloadOutcome:
        logger.log(self._level, "reloading %s (%s)", self.path, trigger)
        try:
            if payload is None:
                loaded, _ = await load_config_async(self.path)
            else:
                loaded = decode_loaded(payload, self.path)
        except ConfigError as error:
            message = describe_config_error(self.path, error)
            self._log_failure(message)
            return ReloadOutcome(False, None, message)
        self._log_warnings(loaded)

        plan = plan_reload(self._state.graph, loaded.graph, self._started)
        try:
            check_ca_files(loaded.graph.clusters.values())
            self._state.check_certificates(kept_tls_listeners(loaded.graph, plan))
            await self._state.open_listeners(plan.added_listeners)
        except BindError as error:
            message = str(error)  # it names the listener and its address
            self._log_failure(message)
            return ReloadOutcome(False, None, message, plan)
        except OSError as error:
            names = ", ".join(f'"{item.name}"' for item in plan.added_listeners)
            message = f"could not bind listener {names}: {error}"
            self._log_failure(message)
            return ReloadOutcome(False, None, message, plan)

        # The same kind of table: a worker's keeps reporting to its supervisor.
        health = self._state.health.successor(loaded.graph.clusters)
        self._state.install(loaded, health, plan)
        self._state.retire(plan)

        if plan.restart_required and self._level == logging.INFO:
            logger.warning(
                "%s changed: restart pgproxy for it to take effect",
                ", ".join(plan.restart_required),
            )
        logger.log(
            self._level,
            "reloaded %s (hash %s): %s",
            self.path,
            loaded.config_hash[:12],
            plan.summary(),
        )
        return ReloadOutcome(True, loaded.config_hash, None, plan)

    def _log_failure(self, message: str) -> None:
        level = logging.ERROR if self._level == logging.INFO else logging.DEBUG
        logger.log(
            level,
            "reload failed, keeping the running config (hash %s): %s",
            self.history.config_hash[:12],
            message,
        )

    def _log_warnings(self, loaded: LoadedGraph) -> None:
        if not loaded.diagnostics or self._level != logging.INFO:
            return
        rendered = "; ".join(item.render() for item in loaded.diagnostics)
        logger.warning(
            "%s has %d warning(s): %s", self.path, len(loaded.diagnostics), rendered
        )
