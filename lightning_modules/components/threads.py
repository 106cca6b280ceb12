"""Run a computation at a fixed number of CPU threads (torch and faiss), then restore.

Float reductions split over a different number of threads add in a different order, so a
stage trained at 1 thread and at 2 threads drifts apart (the tokenizer's SCIDs all differed).
Stages whose artifacts must not depend on the machine's thread setting compute inside
:func:`pinned_threads`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency
        return None
    return faiss


@contextmanager
def pinned_threads(num_threads: int | None):
    """Inside the block torch (intra-op) and faiss (OpenMP) use ``num_threads`` threads;
    ``None`` leaves the process settings alone."""
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    faiss = _faiss()
    old_torch = torch.get_num_threads()
    old_faiss = faiss.omp_get_max_threads() if faiss is not None else num_threads
    # Thread pools are only reconfigured when the number changes (nothing to do, nothing
    # touched, in the usual one-thread processes).
    if old_torch != num_threads:
        torch.set_num_threads(num_threads)
    if old_faiss != num_threads:
        faiss.omp_set_num_threads(num_threads)
    try:
        yield
    finally:
        if old_torch != num_threads:
            torch.set_num_threads(old_torch)
        if old_faiss != num_threads:
            faiss.omp_set_num_threads(old_faiss)
