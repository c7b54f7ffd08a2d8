"""Check that pgproxy's consistent hash picks the same endpoints as nginx's.

Both are configured with the same three ring endpoints, which name themselves
in their response bodies. If the two rings differ, the hash scenario would
spread load differently over the upstreams and the comparison would be
unfair, so the report states how many keys agree.
"""

from __future__ import annotations

import http.client

from harness.measure import Session
from harness.nginx import start_proxy
from harness.pgproxy import start_pgproxy
from harness.processes import BenchError

KEYS = 64


def ring_endpoint(port: int, key: int) -> str:
    """Return the first body line of GET /hash?k=KEY, which names the endpoint."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", f"/hash?k={key}")
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
    finally:
        connection.close()
    if response.status != 200:
        raise BenchError(f"GET /hash?k={key} on port {port} returned {response.status}")
    return body.splitlines()[0] if body else ""


def hash_agreement(session: Session) -> str:
    """Compare the endpoint picked for each of 64 keys; return a report line."""
    nginx, nginx_port = start_proxy(session.workdir, session.upstream, None)
    try:
        pgproxy, pgproxy_port = start_pgproxy(
            session.workdir, session.upstream, cpu=None, name="pgproxy-hash-check"
        )
    except BenchError:
        nginx.stop()
        raise
    try:
        same = sum(
            ring_endpoint(nginx_port, key) == ring_endpoint(pgproxy_port, key)
            for key in range(KEYS)
        )
    finally:
        pgproxy.stop()
        nginx.stop()
    return (
        f"pgproxy picked the same ring endpoint as nginx for {same} of {KEYS} "
        "keys of the consistent-hash scenario."
    )
