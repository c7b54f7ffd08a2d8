"""`pgproxy demo`: three local upstreams behind the proxy, with live traffic.

Everything runs in this process on 127.0.0.1: the demo upstreams on ports
9101-9103 and the proxy on 8080 from the shipped demo config, or free ports
when those are taken. Interactive use shows a live table of requests per
endpoint until Ctrl-C, then exits 0; `--requests N` sends N requests
itself, prints the counts and exits 0. Ctrl-C (SIGINT) or SIGTERM stops a
`--requests` run early: it prints the counts so far and exits 130. A second
signal cuts the proxy's drain short.
"""

from __future__ import annotations

import logging
from typing import Annotated

import anyio
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pgproxy.observability.logging import setup_logging
from pgproxy.server.demo import (
    DemoUpstream,
    bind_or_any,
    demo_addresses,
    demo_config,
    demo_graph,
    send_requests,
)
from pgproxy.server.listeners import BoundListener
from pgproxy.server.runtime import event_loop_options, serve
from pgproxy.server.signals import ShutdownSignals

REFRESH_PER_SECOND = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command it interrupted


def demo_command(
    requests: Annotated[
        int,
        typer.Option(
            "--requests",
            min=0,
            help="Send this many requests, print the counts and exit 0 "
            "(130 when Ctrl-C stops it first). 0, the default, shows the live "
            "table until Ctrl-C instead.",
        ),
    ] = 0,
) -> None:
    """Run three local upstreams and the proxy, and show traffic per endpoint."""
    setup_logging("WARNING")
    console = Console()
    config = demo_config()
    (listen_host, listen_port), endpoints = demo_addresses(config)
    upstreams = [DemoUpstream(bind_or_any(host, port)[0]) for host, port in endpoints]
    listener_sock, preferred = bind_or_any(listen_host, listen_port)
    graph = demo_graph(config, listener_sock, upstreams)
    listener = BoundListener(next(iter(graph.listeners.values())), listener_sock, None)
    host, port = listener.address
    if not preferred or any(
        upstream.address != f"{h}:{p}"
        for upstream, (h, p) in zip(upstreams, endpoints, strict=True)
    ):
        console.print(
            "[yellow]Some demo ports were taken; using free ports instead.[/]"
        )
    console.print(
        f"pgproxy listens on [bold]http://{listener.describe()}[/], balancing over "
        + ", ".join(upstream.address for upstream in upstreams)
    )

    async def main() -> int:
        signals = ShutdownSignals()
        finished = anyio.Event()
        stopped = anyio.Event()
        for upstream in upstreams:
            await upstream.start()

        async def run_proxy() -> None:
            await serve(
                graph,
                shutdown_trigger=finished.wait,
                force_trigger=signals.forced.wait,
                listeners=[listener],
            )
            stopped.set()

        code = 0
        async with anyio.create_task_group() as group:
            group.start_soon(signals.receive)
            group.start_soon(run_proxy)
            if requests:
                ok = await send_until_stopped(host, port, requests, signals)
                if ok is None:
                    code = EXIT_INTERRUPTED
                    served = sum(upstream.served for upstream in upstreams)
                    title = f"interrupted after {served} of {requests} requests"
                else:
                    title = f"{ok}/{requests} requests answered 200"
                console.print(counts_table(upstreams, title=title))
            else:
                console.print(
                    f"Try: [bold]curl http://{listener.describe()}/[/]   (Ctrl-C stops)"
                )
                await show_live(console, upstreams, signals)
            finished.set()
            await stopped.wait()
            group.cancel_scope.cancel()
        for upstream in upstreams:
            upstream.close()
        return code

    code = anyio.run(main, backend="asyncio", backend_options=event_loop_options())
    raise typer.Exit(code)


async def send_until_stopped(
    host: str, port: int, count: int, signals: ShutdownSignals
) -> int | None:
    """Send `count` requests; return the 200s, or None if a signal came first."""
    answered: int | None = None
    async with anyio.create_task_group() as group:

        async def send() -> None:
            nonlocal answered
            answered = await send_requests(host, port, count)
            group.cancel_scope.cancel()

        async def stop() -> None:
            await signals.wait()
            group.cancel_scope.cancel()

        group.start_soon(send)
        group.start_soon(stop)
    return answered


async def show_live(
    console: Console, upstreams: list[DemoUpstream], signals: ShutdownSignals
) -> None:
    """Refresh the traffic table until a shutdown signal arrives."""
    with Live(
        counts_table(upstreams), console=console, refresh_per_second=REFRESH_PER_SECOND
    ) as live:
        while not signals.requested.is_set():
            live.update(counts_table(upstreams))
            with anyio.move_on_after(1 / REFRESH_PER_SECOND):
                await signals.wait()
        # The table left on screen counts the requests of the last refresh
        # period too.
        live.update(counts_table(upstreams))
    logging.getLogger(__name__).debug("demo stopped")


def counts_table(
    upstreams: list[DemoUpstream], title: str = "requests per endpoint"
) -> Table:
    """Render requests served per endpoint with a share bar."""
    total = sum(upstream.served for upstream in upstreams) or 1
    table = Table(title=title)
    table.add_column("endpoint")
    table.add_column("requests", justify="right")
    table.add_column("share")
    for upstream in upstreams:
        share = upstream.served / total
        table.add_row(
            upstream.address,
            str(upstream.served),
            "█" * round(share * 30) + f" {share:.0%}",
        )
    return table
