"""Active health checks: probes sent to every endpoint on an interval.

One probe is one fresh connection: DNS lookup, TCP connect, TLS handshake for
`https://` endpoints (certificate and hostname verified), then for HTTP checks
one request with `Connection: close` whose status must fall in the expected
ranges. The probe's timeout bounds all of these together. Certificates are
verified as the data plane verifies them: against the cluster's
`tls_ca_file` when it has one, else the system store. `probe_endpoint` is
the only place that translates socket, ssl, anyio and httpcore errors of a
probe into the stage that failed. `pgproxy check-upstreams` uses it too.

`run_active_checks` runs one probe loop per endpoint, so a hanging endpoint
never delays the probes of another. Each loop probes at once, then every
interval with +-10% jitter so the probes of many endpoints drift apart
instead of arriving in bursts.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio
import anyio.to_thread
import httpcore

from pgproxy.config.parsing import parse_status_ranges
from pgproxy.graph.settings import HealthCheckSettings
from pgproxy.graph.types import Cluster, Endpoint, Graph
from pgproxy.health.passive import log_transition, run_transition_sweeper
from pgproxy.health.state import HealthTable

logger = logging.getLogger(__name__)

JITTER = 0.1  # each wait is the interval times a factor in [0.9, 1.1]
USER_AGENT = b"pgproxy-health-check"

# Called with each probe's endpoint, verdict and reason, after the table
# recorded it: the supervisor of worker processes forwards it to them.
OutcomeCallback = Callable[[Endpoint, bool, str], None]


class Stage(str, enum.Enum):
    """The step of a probe that failed, or `ok`."""

    DNS = "dns"
    TCP_REFUSED = "tcp_refused"
    TCP_TIMEOUT = "tcp_timeout"
    TLS = "tls"
    HTTP_TIMEOUT = "http_timeout"
    HTTP_STATUS = "http_status"
    PROTOCOL_ERROR = "protocol_error"
    OK = "ok"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Outcome of one probe: the failing stage, the HTTP status if one came."""

    ok: bool
    stage: Stage
    status: int | None
    latency_s: float
    detail: str


# Errors that end one probe step. Anything else is a bug and propagates.
_PROBE_ERRORS = (
    OSError,
    ssl.SSLError,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.TimeoutException,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)
_STEP_FAILURE = {"dns": Stage.DNS, "tcp": Stage.TCP_REFUSED, "tls": Stage.TLS}
_STEP_TIMEOUT = {
    "dns": Stage.DNS,
    "tcp": Stage.TCP_TIMEOUT,
    "tls": Stage.TLS,
    "http": Stage.HTTP_TIMEOUT,
}


@functools.lru_cache(maxsize=1)
def default_ssl_context() -> ssl.SSLContext:
    """Return the shared TLS context: system CAs, certificate and hostname checked."""
    return ssl.create_default_context()


def ca_file_ssl_context(ca_file: str) -> ssl.SSLContext:
    """Return a context verifying against the CA bundle `ca_file`.

    Contexts are kept per (file, modification time), so a probe every few
    seconds does not parse the bundle again, and a rotated file applies to
    the next probe. Raises OSError or ssl.SSLError when the file cannot be
    loaded.
    """
    return _ca_file_context(ca_file, os.stat(ca_file).st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _ca_file_context(ca_file: str, mtime_ns: int) -> ssl.SSLContext:
    del mtime_ns  # part of the cache key only
    return ssl.create_default_context(cafile=ca_file)


def load_tls_contexts(clusters: Iterable[Cluster]) -> None:
    """Load the TLS contexts that the probes of `clusters` use, into their caches.

    Call it in a thread before the probes start. Loading the system CA store
    takes 30-100 ms of CPU (measured with OpenSSL 3.0 and Debian's CA
    bundle). A probe that loaded it on the event loop would stall every
    concurrent probe, so a plain HTTP probe with a short timeout could time
    out. A CA file that cannot be loaded is skipped here, because its probes
    report the error.
    """
    for cluster in clusters:
        if not any(endpoint.tls for endpoint in cluster.endpoints):
            continue
        ca_file = cluster.settings.tls_ca_file
        try:
            if ca_file is None:
                default_ssl_context()
            else:
                ca_file_ssl_context(ca_file)
        except (OSError, ssl.SSLError):
            continue


class _Probe:
    """The steps of one probe; `step` names the step in progress."""

    def __init__(
        self,
        endpoint: Endpoint,
        check: HealthCheckSettings | None,
        ssl_context: ssl.SSLContext | None,
        ca_file: str | None,
    ) -> None:
        self.endpoint = endpoint
        self.check = check
        self.ssl_context = ssl_context
        self.ca_file = ca_file
        self.step = "dns"
        self.stream: httpcore.AsyncNetworkStream | None = None

    async def run(self) -> tuple[Stage, int | None, str]:
        addresses = await self._resolve()
        self.step = "tcp"
        self.stream = await self._connect(addresses)
        if self.endpoint.tls:
            self.step = "tls"
            self.stream = await self.stream.start_tls(
                self._tls_context(), server_hostname=self.endpoint.host
            )
        if self.check is None or self.check.type == "tcp":
            return Stage.OK, None, "connected"
        self.step = "http"
        return await self._request(self.stream, self.check)

    def _tls_context(self) -> ssl.SSLContext:
        if self.ssl_context is not None:
            return self.ssl_context
        if self.ca_file is None:
            return default_ssl_context()
        try:
            return ca_file_ssl_context(self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ssl.SSLError(
                f'cannot load tls_ca_file "{self.ca_file}": {exc}'
            ) from None

    async def aclose(self) -> None:
        if self.stream is not None:
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _resolve(self) -> list[str]:
        host = self.endpoint.host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [host]
        infos = await anyio.getaddrinfo(
            host, self.endpoint.port, type=socket.SOCK_STREAM
        )
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def _connect(self, addresses: list[str]) -> httpcore.AsyncNetworkStream:
        # Addresses are tried in resolver order, so a name with an IPv6 and an
        # IPv4 address still passes when only one of them listens.
        backend = httpcore.AnyIOBackend()
        error: Exception | None = None
        for address in addresses:
            try:
                return await backend.connect_tcp(address, self.endpoint.port)
            except httpcore.ConnectError as exc:
                error = exc
        assert error is not None  # getaddrinfo never returns an empty list
        raise error

    async def _request(
        self, stream: httpcore.AsyncNetworkStream, check: HealthCheckSettings
    ) -> tuple[Stage, int | None, str]:
        endpoint = self.endpoint
        scheme = b"https" if endpoint.tls else b"http"
        host = endpoint.host.encode("idna")
        origin = httpcore.Origin(scheme, host, endpoint.port)
        connection = httpcore.AsyncHTTP11Connection(origin, stream)
        request = httpcore.Request(
            check.method,
            httpcore.URL(
                scheme=scheme, host=host, port=endpoint.port, target=check.path
            ),
            headers=[
                (b"Host", probe_host_header(endpoint, check).encode("idna")),
                (b"User-Agent", USER_AGENT),
                (b"Connection", b"close"),
            ],
        )
        response = await connection.handle_async_request(request)
        await response.aclose()
        status = response.status
        if status > 599:
            # h11 0.16, which httpcore uses, accepts final status codes up to
            # 999. The data plane rejects a code above 599 as an invalid
            # response, so the probe fails it whatever expect_status lists.
            return Stage.HTTP_STATUS, status, f"status {status} is outside 100-599"
        if _status_expected(status, check.expect_status):
            return Stage.OK, status, f"status {status}"
        detail = f"status {status}, expected {check.expect_status}"
        return Stage.HTTP_STATUS, status, detail


def probe_host_header(endpoint: Endpoint, check: HealthCheckSettings) -> str:
    """Return the Host header of an HTTP probe: the configured host or host:port."""
    if check.host:
        return check.host
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{host}:{endpoint.port}"


@functools.lru_cache(maxsize=64)
def _status_ranges(spec: str) -> tuple[tuple[int, int], ...]:
    return parse_status_ranges(spec)


def _status_expected(status: int, spec: str) -> bool:
    return any(low <= status <= high for low, high in _status_ranges(spec))


def _describe_error(exc: BaseException) -> str:
    """Return a one-line message naming the root cause of a probe error."""
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, ssl.SSLCertVerificationError):
        return str(root.verify_message or root)
    if isinstance(root, socket.gaierror) and root.strerror:
        return f"DNS lookup failed: {root.strerror}"
    if isinstance(root, OSError) and not isinstance(root, ssl.SSLError):
        if root.errno:
            # asyncio's message for ECONNREFUSED ("Connect call failed") hides
            # the cause, so the errno text is used instead.
            return os.strerror(root.errno)
    return str(root) or type(root).__name__


async def probe_endpoint(
    endpoint: Endpoint,
    check: HealthCheckSettings | None,
    timeout: float,  # noqa: ASYNC109 - one bound shared by every probe step
    *,
    ssl_context: ssl.SSLContext | None = None,
    ca_file: str | None = None,
) -> ProbeResult:
    """Probe `endpoint` once on a fresh connection, within `timeout` seconds.

    Without a check, or with a TCP check, a completed connect (and TLS
    handshake for https endpoints) is a success. Network, TLS and HTTP
    failures are returned as the stage that failed instead of raised.
    https endpoints are verified with `ssl_context` when given, else against
    the CA bundle `ca_file` (the cluster's tls_ca_file), else the system
    store. A CA file that cannot be loaded fails the probe at the tls stage.
    """
    probe = _Probe(endpoint, check, ssl_context, ca_file)
    started = time.monotonic()
    stage, status, detail = Stage.OK, None, ""
    try:
        with anyio.move_on_after(timeout) as scope:
            stage, status, detail = await probe.run()
        if scope.cancelled_caught:
            stage = _STEP_TIMEOUT[probe.step]
            detail = f"{probe.step} step timed out after {timeout:g}s"
    except _PROBE_ERRORS as exc:
        stage = _STEP_FAILURE.get(probe.step, Stage.PROTOCOL_ERROR)
        detail = _describe_error(exc)
    finally:
        await probe.aclose()
    latency = time.monotonic() - started
    return ProbeResult(stage is Stage.OK, stage, status, latency, detail)


def jittered(interval: float, rng: random.Random) -> float:
    """Return `interval` scaled by a random factor in [1 - JITTER, 1 + JITTER]."""
    return interval * rng.uniform(1.0 - JITTER, 1.0 + JITTER)


async def _probe_once(
    endpoint: Endpoint,
    check: HealthCheckSettings,
    table: HealthTable,
    ca_file: str | None,
    on_outcome: OutcomeCallback | None,
) -> None:
    try:
        result = await probe_endpoint(endpoint, check, check.timeout, ca_file=ca_file)
        reason = (
            result.detail if result.ok else f"{result.stage.value}: {result.detail}"
        )
        ok = result.ok
    except Exception as exc:
        # A bug in the probe must not stop the checks of this endpoint.
        logger.exception("health probe of %s crashed", endpoint)
        ok, reason = False, f"probe crashed: {exc!r}"
    transition = table.record_probe(endpoint, ok, reason)
    if transition is not None:
        log_transition(transition)
    if on_outcome is not None:
        on_outcome(endpoint, ok, reason)


async def _probe_loop(
    endpoint: Endpoint,
    check: HealthCheckSettings,
    table: HealthTable,
    rng: random.Random,
    ca_file: str | None,
    on_outcome: OutcomeCallback | None,
) -> None:
    while True:
        started = anyio.current_time()
        await _probe_once(endpoint, check, table, ca_file, on_outcome)
        wait = jittered(check.interval, rng) - (anyio.current_time() - started)
        await anyio.sleep(max(wait, 0.0))


async def run_active_checks(
    graph: Graph,
    table: HealthTable,
    *,
    stop: anyio.Event | None = None,
    rng: random.Random | None = None,
    on_outcome: OutcomeCallback | None = None,
) -> None:
    """Probe every endpoint of every cluster with a health check, until stopped.

    Also ends finished ejections and logs passive transitions, so start it
    even when no cluster has a health check. Returns when `stop` is set, or
    runs until cancelled when `stop` is None. `on_outcome` is called after
    every probe, once the table recorded it.
    """
    rng = rng or random.Random()
    loops = [
        (endpoint, cluster.settings.health_check, cluster.settings.tls_ca_file)
        for cluster in graph.clusters.values()
        if cluster.settings.health_check is not None
        for endpoint in cluster.endpoints
    ]
    logger.debug("starting health probes of %d endpoints", len(loops))
    await anyio.to_thread.run_sync(load_tls_contexts, graph.clusters.values())
    async with anyio.create_task_group() as group:
        group.start_soon(run_transition_sweeper, table)
        for endpoint, check, ca_file in loops:
            group.start_soon(
                _probe_loop, endpoint, check, table, rng, ca_file, on_outcome
            )
        if stop is not None:
            await stop.wait()
            group.cancel_scope.cancel()
