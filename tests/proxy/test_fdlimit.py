"""The open file limit and the connection cap derived from it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pgproxy.proxy.fdlimit import MIN_CONNECTIONS, RESERVED_DESCRIPTORS, connection_cap


@pytest.mark.parametrize(
    ("limit", "cap"),
    [
        (None, None),
        (1024, (1024 - RESERVED_DESCRIPTORS) // 2),
        (120, 44),
        (40, MIN_CONNECTIONS),
    ],
)
def test_connection_cap(limit: int | None, cap: int | None) -> None:
    assert connection_cap(limit) == cap


def test_raise_reaches_hard_limit() -> None:
    # In a child process, so the test run keeps its own limit.
    script = textwrap.dedent(
        """
        import resource
        from pgproxy.proxy.fdlimit import raise_open_file_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 96))
        print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["96", "(96,", "96)"]
