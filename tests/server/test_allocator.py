"""Tests of the glibc allocator settings."""

from __future__ import annotations

import platform

import pytest

from pgproxy.server.allocator import tune_allocator


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt settings exist only in glibc"
)
def test_tune_allocator_accepted_by_glibc() -> None:
    assert tune_allocator() is True
