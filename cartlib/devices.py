"""Which torch device a stage runs on: ``base.device`` (auto | cpu | cuda | cuda:<index>)."""
from __future__ import annotations

import re

__all__ = ["resolve_device"]


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is present, else ``cpu``; ``cuda``/``cuda:<i>`` must exist."""
    import torch

    from cartlib.config import ConfigError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
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
