"""Keep large CPU tensors in reusable heap memory (glibc only), for the ``compress`` process.

glibc serves every allocation above its mmap threshold (at most 32 MB, however it adapts) with a
fresh ``mmap`` and returns it to the kernel on free, so each new activation of that size is paid
for again in page faults and zeroing. The recovery's full-batch passes create hundreds of them
(ResNet-56 with 1,024 CIFAR images: 67 MB per stage-1 activation): a ReLU of one took 33 ms
instead of 9 ms, and raising the thresholds cut the whole reference run's recovery from 16.7 to
13.3 s, for 0.4-0.7 GB more peak memory. The CLI calls :func:`keep_large_allocations` once at
start; the library never changes the allocator of a process it is imported into.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 30
ENV_SWITCH = "COMPRESS_KEEP_HEAP"  # "0" leaves the allocator alone


def keep_large_allocations(threshold: int = THRESHOLD_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold`` bytes; True when both were accepted.

    A no-op (False) on other C libraries and platforms, or when ``COMPRESS_KEEP_HEAP=0``.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
