"""Data-parallel training on torch.distributed (gloo on CPUs, NCCL on GPUs).

One process per worker; every rank holds the whole model, takes its share of each global batch
(:func:`shard`), and the gradients are summed across ranks before the optimizer step
(:func:`all_reduce_grads`). Each rank weights its local mean loss by its share of the global batch
(``n_rank / n_global``), so the summed gradient is the gradient of the global batch's mean loss:
the same update as one process with the same global batch, up to float summation order.

Two ways in:

- **one machine**: ``train_cart(..., nproc=N)`` (``train.nproc`` in params.yaml) starts N workers
  through torch's elastic launcher, the engine behind ``torchrun`` (:func:`launch`), and waits;
  the DVC stage and its notebook run once, in the parent;
- **a cluster**: ``torchrun --nnodes … --nproc-per-node … -m cartlib.distributed --task image``
  runs the train stage's training in every launched process (see the README,
  "More than one process"); the stage afterwards finds the finished checkpoint and only reports.
"""
from __future__ import annotations

import argparse
import os
import uuid
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["RankInfo", "rank_info", "shard", "share_weight", "all_reduce_grads", "all_reduce_sum", "gather_objects", "launch",
           "backend_for", "worker_device", "broadcast_parameters"]


class RankInfo(NamedTuple):
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info() -> RankInfo:
    """This process's rank and the world size; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size())
    return RankInfo(0, 1)


def shard(idx: Tensor, info: RankInfo) -> Tensor:
    """This rank's share of a global batch: every ``world``-th text from ``rank`` (shares differ by
    at most one text and have similar lengths, the batch being length-bucketed)."""
    return idx[info.rank :: info.world]


def share_weight(n_local: int, n_global: int) -> float:
    """The factor of a rank's mean loss over its ``n_local`` texts such that the gradients summed
    over the ranks are the gradient of the mean loss over the global batch of ``n_global``:
    Σ_r (n_r / N) · mean_r = mean over all N."""
    return n_local / n_global


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over all ranks, as one flat message. A rank whose share of
    the batch was empty contributes zeros."""
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p)
        offset += n


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over all ranks (in place; a no-op outside a process group)."""
    if rank_info().world > 1:
        dist.all_reduce(t)
    return t


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` outside a process group)."""
    info = rank_info()
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's weights and buffers on every rank (the same start, whatever each rank built)."""
    if rank_info().world > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def worker_device(device: torch.device) -> torch.device:
    """The device of this worker: ``cuda:<LOCAL_RANK>`` when training on CUDA (one GPU per local
    process, torchrun's convention), the CPU otherwise."""
    if device.type != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def launch(fn: Callable[..., Any], *args: Any, nproc: int, threads_per_worker: int | None = None) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` fresh local processes with a process group's environment
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), through torch's elastic launcher (what
    ``torchrun --standalone --nproc-per-node N`` does). Returns ``{rank: fn's return value}``.

    ``fn`` and ``args`` must be picklable (tensors travel through shared memory). Each CPU worker
    gets ``threads_per_worker`` intra-op threads (default: this process's threads ÷ nproc), so
    N workers do not oversubscribe the cores."""
    import logging

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)  # not a line per worker event
    threads = threads_per_worker or max(1, torch.get_num_threads() // nproc)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"cart-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # a free port on this machine (torchrun --standalone)
        max_restarts=0, start_method="spawn", monitor_interval=0.1,
    )
    return elastic_launch(config, _with_threads)(threads, fn, *args)


def _with_threads(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    torch.set_num_threads(threads)
    return fn(*args)


# ---------------------------------------------------------------------------- torchrun entry point
def main(argv: list[str] | None = None) -> None:
    """Train the `train` stage's model of one task in every process torchrun launched."""
    ap = argparse.ArgumentParser(
        prog="python -m cartlib.distributed",
        description="The train stage's CART training, run by every process of a torchrun launch (one per GPU; "
                    "several machines with --nnodes/--rdzv-endpoint). Rank 0 writes the resumable checkpoint "
                    "models/<task>/cart_checkpoints/last.pt on the shared filesystem; afterwards `dvc repro "
                    "train@<task>` (or `cart-stage train`) finds it finished and only reports. params.yaml "
                    "train.nproc must equal the total number of processes (nnodes × nproc-per-node).")
    ap.add_argument("--task", required=True, help="image | audio | video")
    ap.add_argument("--root", default=".", help="repository root (params.yaml, data/, models/)")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        ap.error("not launched by torchrun (RANK is not set); on one machine use params.yaml train.nproc instead")
    from cartlib.config import load_params
    from cartlib.paths import task_paths
    from cartlib.stages.train import run

    params = load_params(os.path.join(args.root, "params.yaml"))
    world = int(os.environ["WORLD_SIZE"])
    if world != params.train.nproc:
        raise SystemExit(f"torchrun started {world} processes but params.yaml train.nproc is "
                         f"{params.train.nproc}; set train.nproc: {world} (it is part of the run's key)")
    device = worker_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device))
    try:
        run(params, task_paths(args.root, args.task), progress=rank_info().is_main, publish_results=False,
            train_only=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
