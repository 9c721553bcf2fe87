"""Timing harness of the throughput benchmark: warm up, synchronise the device, repeat interleaved,
report medians (nanoGPT's ``bench.py`` habits), and the peak memory of each call.

:func:`time_interleaved`: one warm-up call, then ``repeats`` timed rounds in which every system of a
group runs once (interleaved, so a load spike hits them alike); the device is synchronised around
each call; queries/s is the median over the repeats of ``batch / seconds`` and latency the median
seconds per batch. A function whose warm-up exceeds ``max_batch_seconds`` is skipped.

Peak memory (:class:`PeakMemory`): on CUDA ``torch.cuda.max_memory_allocated`` around each call; on
a CPU the process's resident-set high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
reset before each call through ``/proc/self/clear_refs`` where Linux allows it, so it is the peak
*during* the batch, everything resident included (gallery, index, model).
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Callable, Mapping, NamedTuple

import torch

__all__ = ["RETAIN_BYTES", "retain_freed_memory", "PeakMemory", "Timing", "sync", "time_interleaved",
           "matmul_flops_per_second", "device_name", "SYNC_OPS", "HostSyncRecorder", "level_loop_syncs"]

RETAIN_BYTES = 256 * 2**20  # freed blocks below this stay in the process (see retain_freed_memory)


def retain_freed_memory(limit: int = RETAIN_BYTES) -> bool:
    """Keep freed heap blocks of up to ``limit`` bytes in the process instead of returning them to
    the OS (glibc ``mallopt`` M_MMAP_THRESHOLD and M_TRIM_THRESHOLD); False where that is not glibc.

    Why: by default glibc maps blocks above a dynamic threshold (128 KiB, rising to at most 32 MiB)
    afresh with ``mmap`` and unmaps them when freed, and trims the heap's free top back to the OS,
    so the activations of each decoding step (a few MB at batch 100) are page-faulted in and zeroed
    by the kernel again: ~10,000 minor faults per batch of 100 queries here, none with this. The
    same reason PyTorch's CPU tuning guides swap in jemalloc/tcmalloc. It is process-wide, so every
    system timed in the process (CART, dual tower, FAISS) gets it alike. Peak RSS may read higher."""
    if sys.platform != "linux":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, int(limit))) and bool(mallopt(m_trim_threshold, int(limit)))


class PeakMemory:
    """Peak memory of one call: CUDA ``max_memory_allocated``, or the CPU process's RSS high-water
    mark (``getrusage``), reset through ``/proc/self/clear_refs`` where the kernel allows."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = False
        if not self.cuda:
            self.resettable = self._clear_refs()
        if self.cuda:
            self.kind = "CUDA max_memory_allocated during the batch"
        elif self.resettable:
            self.kind = "process RSS high-water during the batch (getrusage ru_maxrss, reset via /proc/self/clear_refs)"
        else:
            self.kind = "process RSS high-water since start (getrusage ru_maxrss; no reset on this OS)"

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._clear_refs()

    def read_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class Timing(NamedTuple):
    """One (system, batch) measurement."""

    qps: float  # median over the repeats of batch / seconds; NaN when skipped
    latency_ms_p50: float  # median milliseconds per batch; NaN when skipped
    peak_mem_mb: float  # max over the calls; NaN when skipped
    seconds: tuple[float, ...]  # the timed repeats
    warmup_seconds: float  # NaN when skipped before running
    skipped: str  # "" or why it was skipped


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, batch_size: int, repeats: int,
                     max_batch_seconds: float, device: str | torch.device = "cpu",
                     memory: PeakMemory | None = None, skip: Mapping[str, str] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time each ``fn()`` (one batch of ``batch_size`` queries): one warm-up call each, then
    ``repeats`` rounds in which every function runs once (interleaved). A function whose warm-up
    takes longer than ``max_batch_seconds``, or named in ``skip`` (name -> reason), is skipped.
    The device is synchronised before and after every call; ``clock`` is injectable for tests."""
    device = torch.device(device)
    skip = dict(skip or {})
    nan = float("nan")
    warm: dict[str, float] = {}
    peaks: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in fns}

    def call(name: str) -> float:
        if memory is not None:
            memory.reset()
        sync(device)
        t0 = clock()
        fns[name]()
        sync(device)
        dt = clock() - t0
        if memory is not None:
            peaks[name] = max(peaks.get(name, 0.0), memory.read_mb())
        return dt

    for name in fns:
        if name in skip:
            continue
        warm[name] = call(name)
        if warm[name] > max_batch_seconds:
            skip[name] = f"warm-up batch took {warm[name]:.1f} s > max_batch_seconds={max_batch_seconds:g}"
    live = [name for name in fns if name not in skip]
    for _ in range(repeats):
        for name in live:
            times[name].append(call(name))
    out = {}
    for name in fns:
        if name in skip:
            out[name] = Timing(nan, nan, nan, (), warm.get(name, nan), skip[name])
            continue
        secs = times[name]
        out[name] = Timing(qps=statistics.median(batch_size / max(t, 1e-12) for t in secs),
                           latency_ms_p50=statistics.median(secs) * 1e3,
                           peak_mem_mb=peaks.get(name, nan), seconds=tuple(secs), warmup_seconds=warm[name],
                           skipped="")
    return out


def matmul_flops_per_second(*, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                            size: int | None = None, repeats: int = 5) -> float:
    """Measured rate of a large square matmul on ``device`` (median of ``repeats`` after a warm-up)."""
    device = torch.device(device)
    size = size or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    with torch.inference_mode():
        for r in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            if r:
                times.append(time.perf_counter() - t0)
    return 2.0 * size ** 3 / statistics.median(times)


def device_name(device: str | torch.device) -> str:
    """``torch.cuda.get_device_name()`` on CUDA, else ``cpu-<n>core`` with n = torch's threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{torch.get_num_threads()}core"


# aten ops that make the host wait for the device: a value read back (.item(), bool(), int(), float()),
# or an output whose shape depends on the data (nonzero, boolean-mask indexing, unique, masked_select)
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "masked_select",
                      "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"})


class HostSyncRecorder:
    """Context manager recording every aten op that syncs the host with the device (``SYNC_OPS``,
    or indexing by a bool mask), tagged with the current ``phase`` (set it while recording).

    It watches the ops through a ``TorchDispatchMode``, so it works on any device, a CPU included:
    what would sync a GPU is seen on the CPU run of the same code."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                idx = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
                masked = name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                    isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in idx)
                if name in SYNC_OPS or masked:
                    recorder.syncs.append((recorder.phase, name))
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self.phase = "setup"
        self.syncs: list[tuple[str, str]] = []

    def __enter__(self) -> "HostSyncRecorder":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def ops(self, phase: str) -> list[str]:
        return [op for p, op in self.syncs if p == phase]


def level_loop_syncs(decoder, encoded, prefix_index, *, beam: int, top_k: int) -> tuple[list[str], list[str]]:
    """Host-syncing ops of one :meth:`cartlib.decode.BeamDecoder.search`: ``(in the encoder-side
    memory, after it: the level loop and the result)``. The design: one ``nonzero``, then none."""
    rec = HostSyncRecorder()
    memory = decoder.memory

    def marked(enc):
        rec.phase = "memory"
        out = memory(enc)
        rec.phase = "levels"
        return out

    decoder.memory = marked
    try:
        with rec:
            decoder.search(encoded, prefix_index, beam=beam, top_k=top_k)
    finally:
        del decoder.memory  # the instance attribute: the class's method again
    return rec.ops("memory"), rec.ops("levels")
