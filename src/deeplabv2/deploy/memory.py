"""Resident memory of this process, as ``deeplabv2 bench`` measures it per mode: the peak so
far, the memory now, the memory once what is free has been handed back (what a piece of work
keeps), and a sampler of the peak while a block runs (what a call needs)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource
import sys
import threading
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (it never goes down)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def rss_mib() -> float:
    """Resident memory of this process now, in MiB (``/proc/self/statm``; else the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mib()
    return pages * resource.getpagesize() / 2**20


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, or None (``find_library`` runs ``ldconfig``: once per process)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _malloc_trim() -> None:
    """Hand the C allocator's free memory back to the OS (glibc's ``malloc_trim``; a no-op
    where there is none)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def settled_rss_mib() -> float:
    """Resident memory once what is free has been handed back (Python's garbage collected,
    then :func:`_malloc_trim`): what the process holds, not what its allocators keep cached
    from earlier work. Differences of it measure what a piece of work keeps."""
    gc.collect()
    _malloc_trim()
    return rss_mib()


class RSSSampler:
    """The largest resident memory seen while the ``with`` block runs (sampled every
    ``interval`` s in a thread; the sampled ops release the GIL): the peak of *that* work,
    not the process's running maximum. ``.peak_mib``, ``.start_mib``."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    def __enter__(self):
        self.start_mib = self.peak_mib = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def sample(self) -> float:
        """Read the resident memory now (the thread does this every ``interval``)."""
        self.peak_mib = max(self.peak_mib, rss_mib())
        return self.peak_mib

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, rss_mib())
        return False
