"""Small media towers of the built-in benchmark: image CNN, audio log-mel CNN, video 3-D CNN.

Each maps raw rendered media to a unit vector in the frozen MiniLM text space, so the three
modalities share one space (ImageBind binds every modality to a frozen space the same way;
CART uses ImageBind features for all candidates). Inputs are the arrays of `media.npy`:
image (B, 64, 64, 3) uint8, audio (B, 16000) float16, video (B, T, 32, 32, 3) uint8.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def _groups(channels: int) -> int:
    # GroupNorm, not BatchNorm: no running statistics, so train and eval behave alike
    return max(1, min(8, channels // 4))


def _conv2d(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(_groups(c_out), c_out), nn.GELU())


class _Head(nn.Module):
    """Flatten the last feature map (keeps *where* things are, unlike global pooling) → unit vector."""

    def __init__(self, *, n_in: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(n_in, 512), nn.GELU(), nn.Linear(512, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class ImageTower(nn.Module):
    """(B, 64, 64, 3) uint8 → (B, D) unit vectors. Four stride-2 convolutions: 64 → 4."""

    def __init__(self, *, out_dim: int, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(_conv2d(3, w // 2), _conv2d(w // 2, w), _conv2d(w, 2 * w), _conv2d(2 * w, 4 * w))
        self.head = _Head(n_in=4 * w * 4 * 4, out_dim=out_dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        x = media.permute(0, 3, 1, 2).float().div(255.0).sub(0.5)
        return self.head(self.body(x))


def mel_filterbank(*, n_mels: int, n_fft: int, sample_rate: int, f_min: float = 20.0) -> torch.Tensor:
    """Triangular HTK mel filters, (n_fft // 2 + 1, n_mels)."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mels = np.linspace(hz_to_mel(f_min), hz_to_mel(sample_rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(up, down), 0, None).T.astype(np.float32))


class LogMel(nn.Module):
    """(B, S) waveform → (B, 1, n_mels, frames) log-mel spectrogram (no learned weights)."""

    def __init__(self, *, n_mels: int = 64, n_fft: int = 512, hop: int = 250, sample_rate: int = 16000):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fbank", mel_filterbank(n_mels=n_mels, n_fft=n_fft, sample_rate=sample_rate), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave.float(), self.n_fft, self.hop, window=self.window, return_complex=True).abs().pow(2)
        mel = torch.einsum("bft,fm->bmt", spec, self.fbank)
        return torch.log(mel + 1e-6).div(10.0).unsqueeze(1)  # /10: keep activations O(1)


class AudioTower(nn.Module):
    """(B, 16000) waveform → log-mel (B, 1, 64, 65) → CNN → (B, D) unit vectors."""

    def __init__(self, *, out_dim: int, width: int = 32, n_mels: int = 64):
        super().__init__()
        w = width
        self.frontend = LogMel(n_mels=n_mels)
        self.body = nn.Sequential(_conv2d(1, w // 2), _conv2d(w // 2, w), _conv2d(w, 2 * w), _conv2d(2 * w, 4 * w))
        with torch.no_grad():
            n_flat = self.body(self.frontend(torch.zeros(1, 16000))).numel()
        self.head = _Head(n_in=n_flat, out_dim=out_dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.frontend(media)))


class VideoTower(nn.Module):
    """(B, T, 32, 32, 3) uint8 → 3-D CNN (time is a real axis: direction, growth, turning) → (B, D)."""

    def __init__(self, *, out_dim: int, width: int = 32, n_frames: int = 8):
        super().__init__()
        w = width

        def block(c_in, c_out, t_stride):
            return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride=(t_stride, 2, 2), padding=1), nn.GroupNorm(_groups(c_out), c_out), nn.GELU())

        self.body = nn.Sequential(block(3, w // 2, 1), block(w // 2, w, 2), block(w, 2 * w, 2), block(2 * w, 4 * w, 2))
        t_out = math.ceil(n_frames / 8)
        self.head = _Head(n_in=4 * w * t_out * 2 * 2, out_dim=out_dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        x = media.permute(0, 4, 1, 2, 3).float().div(255.0).sub(0.5)  # (B, 3, T, H, W)
        return self.head(self.body(x))


def build_tower(task: str, *, out_dim: int, width: int, n_mels: int, media_shape: tuple[int, ...]) -> nn.Module:
    if task == "image":
        return ImageTower(out_dim=out_dim, width=width)
    if task == "audio":
        return AudioTower(out_dim=out_dim, width=width, n_mels=n_mels)
    if task == "video":
        return VideoTower(out_dim=out_dim, width=width, n_frames=media_shape[0])
    raise ValueError(f"unknown task {task!r}; expected image, audio or video")
