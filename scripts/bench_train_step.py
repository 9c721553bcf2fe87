"""Benchmark: seconds per CART training step (batch 128, frozen MiniLM) for a few model settings.

Prints the median of 3 steps after one warm-up step for: fusion on with R-Drop (ω = 1), fusion on
without it (ω = 0), a width-256 decoder, and fusion off. Run: `.venv/bin/python scripts/bench_train_step.py`.
"""
from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from cartlib.encoders.text import load_text_encoder
from cartlib.model.cart import CartModel
from cartlib.train import cart_loss

SETTINGS = [  # (d_model, n_heads, fusion, ω)
    (384, 6, True, 1.0),
    (384, 6, True, 0.0),
    (256, 4, True, 1.0),
    (384, 6, False, 1.0),
]


def main() -> None:
    tok, enc = load_text_encoder()
    texts = ["a small crimson circle in the upper left corner next to a large blue square on stripes"] * 128
    batch = tok(texts, padding=True, return_tensors="pt")
    codes = torch.randint(0, 64, (128, 4), generator=torch.Generator().manual_seed(0))
    print(f"batch {tuple(batch['input_ids'].shape)}, torch threads {torch.get_num_threads()}")
    for d_model, heads, fusion, omega in SETTINGS:
        model = CartModel(text_encoder=enc, freeze_encoder=True, level_sizes=(64, 64, 64, 64), d_model=d_model,
                          n_layers=2, n_heads=heads, fusion=fusion).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        times = []
        for _ in range(4):
            start = time.perf_counter()
            loss = cart_loss(model, batch["input_ids"], batch["attention_mask"], codes, consistency_weight=omega).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        print(f"d_model={d_model} fusion={fusion} omega={omega}: {statistics.median(times[1:]):.2f} s/step")


if __name__ == "__main__":
    main()
