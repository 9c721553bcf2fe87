"""Which torch device a stage runs on: ``base.device`` (auto | cpu | cuda | cuda:<index>).

``auto`` is ``cpu`` without CUDA and ``cuda`` with one GPU. With more than one visible GPU each
process claims one of its own (DVC's queue workers, ``dvc queue start --jobs N``, have no per-worker
device setting): it takes an exclusive, non-blocking ``flock`` on ``<lock dir>/gpu<i>.lock`` for the
first free ``i`` and holds it until the process exits, so N workers on one machine train on N
different GPUs; when all are taken it waits (a message says so) until one is released. The lock dir
is ``$CART_GPU_LOCK_DIR``, else ``<system temp>/cart-gpu-locks-<uid>`` (one per user and machine:
all processes that should share the GPUs must see the same folder and the same
``CUDA_VISIBLE_DEVICES``). A claim is made once per process; later calls return the same device.

``cuda`` and ``cuda:<i>`` never claim. In a torch.distributed worker (``LOCAL_RANK`` set, e.g. by
torchrun) ``auto`` is ``cuda:<LOCAL_RANK>`` when CUDA is present: the launcher assigns the GPUs.
"""
from __future__ import annotations

import fcntl
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, NamedTuple

__all__ = ["resolve_device", "claim_gpu", "release_gpu", "gpu_lock_dir"]

LOCK_DIR_ENV = "CART_GPU_LOCK_DIR"
POLL_SECONDS = 5.0  # how often a process waiting for a GPU tries again


class _Claim(NamedTuple):
    index: int
    count: int
    handle: IO[str]


_claim: _Claim | None = None  # this process's GPU, held until exit (or release_gpu)


def gpu_lock_dir() -> Path:
    """``$CART_GPU_LOCK_DIR``, else ``<system temp>/cart-gpu-locks-<uid>``."""
    env = os.environ.get(LOCK_DIR_ENV)
    path = Path(env) if env else Path(tempfile.gettempdir()) / f"cart-gpu-locks-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _try_lock(path: Path) -> IO[str] | None:
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")  # who holds it, for a curious reader; the flock is what counts
    handle.flush()
    return handle


def claim_gpu(count: int, *, poll: float | None = None) -> int:
    """The index (0 ≤ i < ``count``) of a GPU no other process holds, locked for this process's lifetime.

    Idempotent within a process. Waits, polling every ``poll`` seconds, while all ``count`` are held.
    """
    global _claim
    if _claim is not None and _claim.count == count:
        return _claim.index
    release_gpu()
    folder = gpu_lock_dir()
    waiting = False
    while True:
        for i in range(count):
            handle = _try_lock(folder / f"gpu{i}.lock")
            if handle is not None:
                _claim = _Claim(i, count, handle)
                if waiting:
                    print(f"cartlib: claimed GPU {i}", file=sys.stderr, flush=True)
                return i
        if not waiting:
            print(f"cartlib: all {count} GPUs are held by other processes (locks in {folder}); waiting for one",
                  file=sys.stderr, flush=True)
            waiting = True
        time.sleep(POLL_SECONDS if poll is None else poll)


def release_gpu() -> None:
    """Give this process's GPU back (it is also released when the process exits)."""
    global _claim
    if _claim is not None:
        _claim.handle.close()  # closing the file drops the flock
        _claim = None


def resolve_device(device: str) -> str:
    """``auto`` → ``cpu`` without CUDA, ``cuda:<LOCAL_RANK>`` in a torch.distributed worker, ``cuda``
    with one GPU, ``cuda:<i>`` claimed by `claim_gpu` with several; ``cuda``/``cuda:<i>`` must exist."""
    import torch

    from cartlib.config import ConfigError

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        if os.environ.get("LOCAL_RANK"):
            return f"cuda:{int(os.environ['LOCAL_RANK'])}"
        n = torch.cuda.device_count()
        return "cuda" if n <= 1 else f"cuda:{claim_gpu(n)}"
    if device == "cpu":
        return device
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        raise ConfigError(f"base.device: {device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:<index>'")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(m.group(1) or 0)
    if index >= n:
        raise ConfigError(f"base.device is {device!r} but this machine has {n} CUDA device(s); use 'auto' or 'cpu'")
    return device
