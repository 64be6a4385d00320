"""The CLI's allocator setting: applied on glibc, skipped when switched off or unavailable."""

from __future__ import annotations

import ctypes.util
import platform
import sys

import pytest

from compressor import allocator


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert allocator.keep_large_allocations() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt thresholds are a glibc feature")
def test_applied_on_glibc(monkeypatch):
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    assert ctypes.util.find_library("c")
    assert allocator.keep_large_allocations() is True


def test_missing_libc_is_not_an_error(monkeypatch):
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")

    def no_libc(_name):
        raise OSError("no C library")

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_libc)
    assert allocator.keep_large_allocations() is False
