"""Background read-ahead of memory-mapped tables that are read row by row.

Gemma 3n's per-layer embedding table (2 B values in E2B: 4 GB as bfloat16) stays in the file and each token reads
one row of it. A row whose pages are not in the page cache is a disk read: 30-100 ms measured on this project's
machine, more than a whole decode step. So after loading, the table's pages are handed to the kernel's read-ahead
(madvise MADV_WILLNEED, as llama.cpp does for its whole file, but in pieces from a background thread: Linux reads
only the first few hundred KB of one large request; paced, so that it leaves a slow disk free for the rows a
step needs now): the pages arrive in the page cache in the background,
which the system may evict again under pressure; the process's resident memory does not grow (pages are mapped
only when a row is read). GEMMA3N_PREFETCH=0 turns it off (a machine that should not spend the disk time)."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
import time

_MADV_WILLNEED = 3  # Linux, macOS and the BSDs


_CHUNK = 1 << 20  # Linux caps one read-ahead request at max(read_ahead_kb, max_sectors_kb): ask in small pieces
_PAUSE = 0.01  # at most ~100 MB/s of read-ahead: a slow disk keeps most of its time for the reads a step waits on


def prefetch(address: int, nbytes: int) -> bool:
    """Have [address, address + nbytes) of a file mapping read ahead, in a background thread; False where it
    cannot be done."""
    if os.environ.get("GEMMA3N_PREFETCH", "1") == "0" or nbytes <= 0 or os.name != "posix":
        return False
    libc = _libc()
    if libc is None:
        return False
    start = address // mmap.PAGESIZE * mmap.PAGESIZE
    end = address + nbytes

    def advise():  # one chunk at a time, paced, so that the rows a step needs now are not queued behind it
        for at in range(start, end, _CHUNK):
            if libc.madvise(ctypes.c_void_p(at), ctypes.c_size_t(min(_CHUNK, end - at)), _MADV_WILLNEED):
                return
            time.sleep(_PAUSE)
    threading.Thread(target=advise, name="gemma3n-prefetch", daemon=True).start()
    return True


def prefetch_table(table) -> bool:
    """A torch tensor or numpy array that is a view of a file mapping (anything else: no effect)."""
    if hasattr(table, "data_ptr"):
        return prefetch(table.data_ptr(), table.numel() * table.element_size())
    if hasattr(table, "ctypes"):
        return prefetch(table.ctypes.data, table.nbytes)
    return False


_LIBC: list = []


def _libc():
    if not _LIBC:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name, use_errno=True) if name else None
        except OSError:
            lib = None
        if lib is not None and hasattr(lib, "madvise"):
            lib.madvise.argtypes, lib.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        else:
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]
