"""The load scenarios: what wrk requests, over how many connections.

Each scenario names the upstream path that produces its response, so the
same scenario can be aimed at the upstream directly, at nginx and at
pgproxy, which all serve the same paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.nginx import LARGE_BODY_BYTES

_PLAIN_GET = "-- Plain GET of the URL's path; only the done hook is added."

_UPLOAD = f"""
wrk.method = "POST"
wrk.body = string.rep("u", {LARGE_BODY_BYTES})
wrk.headers["Content-Type"] = "application/octet-stream"
"""

# Keys cycle through 1,024 values so every ring endpoint gets traffic.
_HASH = """
local counter = 0
request = function()
    counter = counter + 1
    return wrk.format(nil, "/hash?k=" .. (counter % 1024))
end
"""


@dataclass(frozen=True, slots=True)
class Scenario:
    """One benchmark scenario."""

    name: str
    title: str
    path: str
    connections: int
    request_lua: str = _PLAIN_GET
    headers: tuple[str, ...] = ()
    request_body_bytes: int = 0
    uses_ring: bool = False

    def load(self) -> str:
        """Describe the load as wrk options, for the report."""
        headers = "".join(f' -H "{header}"' for header in self.headers)
        return f"wrk -t1 -c{self.connections}{headers} {self.path}"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="keepalive-100b",
        title="100-byte responses, keep-alive",
        path="/small",
        connections=64,
    ),
    Scenario(
        name="keepalive-16k",
        title="16 KiB responses, keep-alive",
        path="/16k",
        connections=64,
    ),
    Scenario(
        name="close-100b",
        title="100-byte responses, new connection per request",
        path="/small",
        connections=64,
        headers=("Connection: close",),
    ),
    Scenario(
        name="download-1m",
        title="1 MiB responses (downstream)",
        path="/1m",
        connections=16,
    ),
    Scenario(
        name="upload-1m",
        title="1 MiB POST bodies (upstream)",
        path="/upload",
        connections=16,
        request_lua=_UPLOAD,
        request_body_bytes=LARGE_BODY_BYTES,
    ),
    Scenario(
        name="hash-3",
        title="consistent hash over 3 endpoints, 100-byte responses",
        path="/hash",
        connections=64,
        request_lua=_HASH,
        uses_ring=True,
    ),
)

# Measurements that are not wrk scenarios but can be selected the same way.
EXTRA_CHECKS = ("idle-1000", "workers")


def scenario_names() -> list[str]:
    """Return every selectable name: the scenarios, then the extra checks."""
    return [scenario.name for scenario in SCENARIOS] + list(EXTRA_CHECKS)


def by_name(name: str) -> Scenario:
    """Return the scenario called `name`; raise KeyError when there is none."""
    for scenario in SCENARIOS:
        if scenario.name == name:
            return scenario
    raise KeyError(name)
