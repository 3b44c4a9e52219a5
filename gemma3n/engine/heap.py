"""Giving freed heap memory back to the operating system.

glibc keeps memory that Python and PyTorch free inside its arenas (one per thread that allocated) and reuses it
later; after a burst of work (loading a tokenizer, a server's batch of requests with their K/V copies) that memory
stays in the resident set and, fragmented across arenas, grows from one burst to the next. `return_freed_heap()`
hands the whole free pages back; `limit_arenas()` keeps the number of arenas that can fragment small.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_ARENA_MAX = -8  # mallopt parameter number (malloc.h)


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_heap() -> bool:
    """malloc_trim(0): free pages of every arena go back to the OS. False where the C library has no such call."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def limit_arenas(count: int) -> bool:
    """At most `count` malloc arenas from now on (threads share them): a long-running server's threads (event loop,
    model thread, worker pool) otherwise each fragment an arena of their own."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, int(count)))
