"""base.device resolution (cartlib/devices.py): per-process GPU claims by flock, on a CPU machine.

The GPU branches are covered by monkeypatching torch's device count; the claims themselves are
plain file locks, exercised by real subprocesses (claim_gpu needs no torch)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cartlib import devices
from cartlib.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CART_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    devices.release_gpu()
    yield tmp_path / "locks"
    devices.release_gpu()


def gpus(monkeypatch, n: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_auto_without_cuda_is_cpu_and_claims_nothing(monkeypatch, lock_dir):
    gpus(monkeypatch, 0)
    assert devices.resolve_device("auto") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.resolve_device("auto") == "cpu"
    assert not lock_dir.exists()


def test_auto_with_one_gpu_is_cuda_without_a_claim(monkeypatch, lock_dir):
    gpus(monkeypatch, 1)
    assert devices.resolve_device("auto") == "cuda"
    assert not lock_dir.exists()


def test_auto_with_several_gpus_claims_one_once_per_process(monkeypatch, lock_dir):
    gpus(monkeypatch, 3)
    assert devices.resolve_device("auto") == "cuda:0"
    assert devices.resolve_device("auto") == "cuda:0"  # idempotent: the same claim, not a second GPU
    assert sorted(p.name for p in lock_dir.iterdir()) == ["gpu0.lock"]


def test_explicit_devices_never_claim(monkeypatch, lock_dir):
    gpus(monkeypatch, 3)
    assert devices.resolve_device("cuda:2") == "cuda:2"
    assert devices.resolve_device("cuda") == "cuda"
    assert devices.resolve_device("cpu") == "cpu"
    assert not lock_dir.exists()
    with pytest.raises(ConfigError, match="3 CUDA device"):
        devices.resolve_device("cuda:3")
    with pytest.raises(ConfigError, match="not one of"):
        devices.resolve_device("gpu")


def test_distributed_worker_uses_its_local_rank(monkeypatch, lock_dir):
    gpus(monkeypatch, 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert devices.resolve_device("auto") == "cuda:2"
    assert not lock_dir.exists()


HOLDER = """
import sys
from cartlib import devices
print(devices.claim_gpu(int(sys.argv[1]), poll=0.05), flush=True)
sys.stdin.read()  # hold the claim until the test closes stdin
"""


def holder(n: int, lock_dir: Path) -> subprocess.Popen:
    import os

    return subprocess.Popen([sys.executable, "-c", HOLDER, str(n)], cwd=ROOT, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "CART_GPU_LOCK_DIR": str(lock_dir)})


def test_processes_claim_distinct_gpus_wait_when_all_are_taken_and_reclaim_a_released_one(lock_dir):
    procs = [holder(3, lock_dir) for _ in range(3)]
    try:
        claimed = [int(p.stdout.readline()) for p in procs]
        assert sorted(claimed) == [0, 1, 2]
        waiter = holder(3, lock_dir)
        procs.append(waiter)
        assert waiter.stderr.readline().startswith("cartlib: all 3 GPUs are held by other processes")
        time.sleep(0.3)
        assert waiter.poll() is None  # still waiting, nothing claimed
        gone = procs[1]
        gone.stdin.close()
        gone.wait(timeout=30)  # its exit releases its lock
        assert int(waiter.stdout.readline()) == claimed[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.stdin.close()
                p.wait(timeout=30)


def test_a_released_claim_is_free_for_this_process_again(monkeypatch, lock_dir):
    assert devices.claim_gpu(2) == 0
    other = holder(2, lock_dir)
    try:
        assert int(other.stdout.readline()) == 1
        devices.release_gpu()
        assert devices.claim_gpu(2) == 0
    finally:
        other.stdin.close()
        other.wait(timeout=30)
