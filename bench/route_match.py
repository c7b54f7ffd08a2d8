"""Measure route matching on a generated 2,000-route config, and balancer picks.

Run from the repository root:

    python bench/route_match.py --routes 2000 --seed 1

For each request class (exact host, wildcard host, path prefix without host,
path regex, no match) the script builds up to 200 requests that target
routes of the config, checks that the router returns the route each one
targets, then times repeated matching and prints matches per second and
microseconds per match. A linear scan over every route (the reference used
by `pgproxy explain`) is timed too, for scale. Balancers are timed on the
first candidate of `candidates()`, as the proxy uses it on each request.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gen_routes import generate_config

from pgproxy.balancing import Balancer, build_balancer
from pgproxy.config.models import ClusterConfig
from pgproxy.graph.load import load_graph
from pgproxy.graph.routing import explain_match
from pgproxy.graph.types import Cluster, Endpoint, Graph, Route

Request = tuple[str, str | None, str, dict[str, str]]  # method, host, path, headers
REQUESTS_PER_CLASS = 200
TIME_BUDGET_S = 1.0


def _request_for(route: Route, rng: random.Random) -> Request:
    method = sorted(route.methods)[0] if route.methods else "GET"
    headers = dict(route.headers)
    host: str | None = None
    if route.host is not None:
        host = route.host.replace("*", f"h{rng.randrange(100)}", 1)
    if route.path_kind == "prefix":
        path = route.path + "/item/7"
    elif route.path_kind == "regex":
        # Generated regexes read "^/WORD/N/[0-9]+$".
        path = route.path.removeprefix("^").replace("[0-9]+$", "12345")
    else:
        path = route.path or "/"
    return method, host, path, headers


def _host_kind(route: Route) -> str:
    if route.host is None:
        return "any"
    return "wildcard" if route.host.startswith("*.") else "exact"


def _classes(graph: Graph) -> dict[str, list[tuple[Request, Route | None]]]:
    rng = random.Random(7)
    filters: dict[str, Callable[[Route], bool]] = {
        "exact host + prefix": lambda r: (
            _host_kind(r) == "exact" and r.path_kind == "prefix"
        ),
        "wildcard host": lambda r: _host_kind(r) == "wildcard",
        "prefix, no host": lambda r: r.host is None and r.path_kind == "prefix",
        "regex path": lambda r: r.path_kind == "regex",
    }
    classes: dict[str, list[tuple[Request, Route | None]]] = {}
    for label, keep in filters.items():
        routes = [route for route in graph.routes if keep(route)]
        chosen = rng.sample(routes, min(REQUESTS_PER_CLASS, len(routes)))
        classes[label] = [(_request_for(route, rng), route) for route in chosen]
    classes["no match"] = [
        (("GET", f"nomatch{i}.example.org", f"/nothing/{i}", {}), None)
        for i in range(REQUESTS_PER_CLASS)
    ]
    return classes


def _time(call: Callable[[], object], count: int) -> tuple[int, float]:
    """Call `call` in rounds of `count` until the time budget is spent."""
    calls = 0
    start = time.perf_counter()
    while True:
        for _ in range(count):
            call()
        calls += count
        elapsed = time.perf_counter() - start
        if elapsed >= TIME_BUDGET_S:
            return calls, elapsed


def _bench_routes(graph: Graph) -> None:
    print(f"{'request class':<22}{'requests':>9}{'matches/s':>12}{'us/match':>10}")
    for label, cases in _classes(graph).items():
        correct = sum(
            graph.match("public", m, h, p, hs) is route
            for (m, h, p, hs), route in cases
        )
        requests = itertools.cycle([request for request, _ in cases])

        def one(requests: Iterator[Request] = requests) -> None:
            method, host, path, headers = next(requests)
            graph.match("public", method, host, path, headers)

        calls, elapsed = _time(one, 1000)
        rate = calls / elapsed
        print(f"{label:<22}{len(cases):>9}{rate:>12,.0f}{1e6 / rate:>10.2f}", end="")
        print(f"   ({correct}/{len(cases)} got the expected answer)")

    no_match: Request = ("GET", "nomatch.example.org", "/nothing", {})
    calls, elapsed = _time(lambda: explain_match(graph.routes, "public", *no_match), 5)
    print(f"{'linear scan, no match':<22}{'':>9}{calls / elapsed:>12,.0f}", end="")
    print(f"{1e6 * elapsed / calls:>10.0f}   (reference: every route checked)")


def _endpoints(count: int) -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(f"10.0.0.{i + 1}:8000", f"10.0.0.{i + 1}", 8000, False, 1 + i % 3, "c")
        for i in range(count)
    )


def _first_candidate(balancer: Balancer, key: str | None) -> Endpoint:
    return next(balancer.candidates(key))


def _all_candidates(balancer: Balancer, key: str | None) -> list[Endpoint]:
    return list(balancer.candidates(key))


def _bench_balancers() -> None:
    print(f"\n{'balancer':<18}{'endpoints':>10}{'first pick us':>15}{'all us':>9}")
    for kind in ("round_robin", "consistent_hash", "least_request", "random"):
        for count in (3, 20):
            endpoints = _endpoints(count)
            config = ClusterConfig(
                endpoints=[e.address for e in endpoints],
                balancer=kind,
                hash_key="header:x-user" if kind == "consistent_hash" else None,
            )
            cluster = Cluster("c", endpoints, config)
            balancer = build_balancer(cluster, random.Random(1))
            key = "user-4711" if kind == "consistent_hash" else None
            first = functools.partial(_first_candidate, balancer, key)
            every = functools.partial(_all_candidates, balancer, key)
            calls, elapsed = _time(first, 1000)
            all_calls, all_elapsed = _time(every, 200)
            first_us = 1e6 * elapsed / calls
            all_us = 1e6 * all_elapsed / all_calls
            print(f"{kind:<18}{count:>10}{first_us:>15.2f}{all_us:>9.2f}")


def main() -> None:
    """Generate the config, load it, and print the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=2000, help="number of routes")
    parser.add_argument("--seed", type=int, default=1, help="generator seed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "routes.toml"
        path.write_text(generate_config(args.routes, args.seed))
        start = time.perf_counter()
        loaded = load_graph(path)
        load_ms = 1000 * (time.perf_counter() - start)
    graph = loaded.graph
    print(f"python {sys.version.split()[0]}, {len(graph.routes)} routes, ", end="")
    print(f"load_graph (read, parse, validate, build, checks) {load_ms:.0f} ms\n")
    _bench_routes(graph)
    _bench_balancers()


if __name__ == "__main__":
    main()
