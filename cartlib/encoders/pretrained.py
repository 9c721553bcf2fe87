"""Item and query features from LOCAL pretrained weights, through transformers (no download).

- `clip`: a CLIP-style model (`get_image_features` + `get_text_features`, e.g. `CLIPModel`) for
  images, and for videos: `n_frames` frames sampled uniformly (PyAV), each embedded as an image,
  unit-normalised, mean-pooled, normalised again (the CLIP4Clip mean-pooling baseline).
- `clap`: a CLAP-style model (`get_audio_features` + `get_text_features`, e.g. `ClapModel`) for
  audio; WAVs are resampled to the feature extractor's rate.
The text tower of the same model embeds the queries, so items and queries share one space (as
ImageBind gives the paper). Outputs are L2-normalised float32. Work goes in batches, on `device`,
with progress bars; with `cache_dir`, each batch's vectors are saved as one .npy (atomically) and
reused on the next run, so an interrupted extraction resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import enum
import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from cartlib import io
from cartlib.data import real, schema

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local weights only; a hub lookup otherwise retries for ~50 s
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class EncoderKind(str, enum.Enum):
    CLIP = "clip"  # image-text; videos as mean-pooled frames
    CLAP = "clap"  # audio-text


MODALITIES = {EncoderKind.CLIP: ("image", "video"), EncoderKind.CLAP: ("audio",)}
MEDIA_METHOD = {EncoderKind.CLIP: "get_image_features", EncoderKind.CLAP: "get_audio_features"}


class PretrainedEncoder(NamedTuple):
    kind: EncoderKind
    model: torch.nn.Module  # eval mode, on `device`
    processor: object  # the model's processor: .tokenizer + .image_processor / .feature_extractor
    device: str
    dim: int  # the shared embedding width (projection_dim)
    path: Path
    fingerprint: str  # digest of kind + config + weight files: the cache key of this model


class ExtractedFeatures(NamedTuple):
    items: np.ndarray  # (N, D) float32 unit rows, row i = items.tsv row i
    caption_ids: np.ndarray  # (Q,) every reference caption, in captions.tsv order
    captions: np.ndarray  # (Q, D) float32 unit rows
    meta: dict  # for `save_features`


def load_pretrained(*, kind: str | EncoderKind, model_path: str | Path, device: str = "cpu") -> PretrainedEncoder:
    """Model + processor from a local folder (as written by `save_pretrained`)."""
    from transformers import AutoModel, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kind = _kind(kind)
    path = _check_folder(model_path)
    device = _device(device)
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot load a model from this folder ({type(e).__name__}: {e})") from None
    needed = (MEDIA_METHOD[kind], "get_text_features")
    if not all(hasattr(model, m) for m in needed):
        raise ValueError(f"{path}: {type(model).__name__} is not {kind.value.upper()}-style "
                         f"(needs {' + '.join(needed)}); is features.encoder right for this model?")
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot load the processor (tokenizer + image processor / feature extractor "
                         f"files) ({type(e).__name__}: {e})") from None
    part = "image_processor" if kind is EncoderKind.CLIP else "feature_extractor"
    if not hasattr(processor, "tokenizer") or not hasattr(processor, part):
        raise ValueError(f"{path}: processor {type(processor).__name__} lacks a tokenizer or {part}")
    dim = int(getattr(model.config, "projection_dim", 0) or 0)
    return PretrainedEncoder(kind, model.eval().to(device), processor, device, dim, path, _fingerprint(kind, path))


def _kind(kind: str | EncoderKind) -> EncoderKind:
    try:
        return EncoderKind(kind)
    except ValueError:
        raise ValueError(f"encoder kind {kind!r}: expected one of {[k.value for k in EncoderKind]}") from None


def _check_folder(model_path: str | Path) -> Path:
    path = Path(model_path).expanduser()
    if not str(model_path).strip() or not path.is_dir():
        raise ValueError(f"{path}: features.model_path is not a local model folder (no download is attempted)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; expected a folder written by save_pretrained")
    return path.resolve()


def _device(device: str) -> str:
    from cartlib.config import resolve_device

    return resolve_device(device) if device in ("auto", "cuda") else device


def _fingerprint(kind: EncoderKind, path: Path) -> str:
    """Changes when the config or any weight file changes, so stale cache entries are never reused."""
    h = hashlib.sha256(kind.value.encode())
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- text

def text_max_length(encoder: PretrainedEncoder) -> int:
    """Tokens the text tower takes: its position table (RoBERTa-style towers reserve 2 slots)."""
    cfg = getattr(encoder.model.config, "text_config", encoder.model.config)
    limit = int(getattr(cfg, "max_position_embeddings", 77))
    if encoder.kind is EncoderKind.CLAP:
        limit -= 2
    tok_max = getattr(encoder.processor.tokenizer, "model_max_length", limit) or limit
    return int(min(limit, tok_max))


def encode_texts(texts: Sequence[str], *, encoder: PretrainedEncoder, batch_size: int = 256,
                 cache_dir: str | Path | None = None, progress: bool = False) -> np.ndarray:
    """Texts → (Q, D) unit vectors. Sorted by length first so batches pad little."""
    texts = [str(t) for t in texts]
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"empty text at position {empty[0]} (of {len(texts)}); every query needs words")
    order = np.argsort([len(t) for t in texts], kind="stable")
    sorted_texts = [texts[i] for i in order]
    max_length = text_max_length(encoder)

    @torch.inference_mode()
    def compute(batch: list[str]) -> np.ndarray:
        tok = encoder.processor.tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                                          return_tensors="pt")
        inputs = {k: v.to(encoder.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return _unit(_pooled(encoder.model.get_text_features(**inputs)))

    vecs = _batched(sorted_texts, keys=sorted_texts, compute=compute, batch_size=batch_size,
                    cache=_cache_folder(cache_dir, encoder, "text", f"len{max_length}"), desc="encode queries",
                    progress=progress)
    out = np.empty_like(vecs)
    out[order] = vecs
    return out


# ----------------------------------------------------------------------------- media

def encode_media(paths: Sequence[str | Path], *, encoder: PretrainedEncoder, modality: str, batch_size: int = 32,
                 n_frames: int = 8, cache_dir: str | Path | None = None, progress: bool = False) -> np.ndarray:
    """Media files → (N, D) unit vectors; an unreadable file raises `MediaError` naming it."""
    if modality not in MODALITIES[encoder.kind]:
        raise ValueError(f"a {encoder.kind.value} encoder embeds {' or '.join(MODALITIES[encoder.kind])}, "
                         f"not {modality}; use " + ("clap" if modality == "audio" else "clip"))
    if n_frames < 1:
        raise ValueError(f"n_frames must be ≥ 1, got {n_frames}")
    paths = [Path(p) for p in paths]
    compute = {"image": _image_batch, "audio": _audio_batch, "video": _video_batch}[modality]
    variant = f"frames{n_frames}" if modality == "video" else ""
    return _batched(paths, keys=[_file_key(p) for p in paths],
                    compute=lambda batch: compute(batch, encoder=encoder, n_frames=n_frames), batch_size=batch_size,
                    cache=_cache_folder(cache_dir, encoder, modality, variant), desc=f"encode {modality}",
                    progress=progress)


def _file_key(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        raise real.MediaError(f"{path}: media file not found") from None
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"  # an edited file gets new vectors


@torch.inference_mode()
def _image_batch(paths: list[Path], *, encoder: PretrainedEncoder, n_frames: int) -> np.ndarray:
    return _unit(_embed_images([real.load_image(p) for p in paths], encoder))


@torch.inference_mode()
def _video_batch(paths: list[Path], *, encoder: PretrainedEncoder, n_frames: int) -> np.ndarray:
    frames = [f for p in paths for f in real.load_video_frames(p, n_frames=n_frames)]  # B * n_frames images
    per_frame = torch.nn.functional.normalize(_embed_images(frames, encoder), dim=-1)
    return _unit(per_frame.reshape(len(paths), n_frames, -1).mean(1))


def _embed_images(images: list, encoder: PretrainedEncoder) -> torch.Tensor:
    pixels = encoder.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return _pooled(encoder.model.get_image_features(pixel_values=pixels.to(encoder.device)))


@torch.inference_mode()
def _audio_batch(paths: list[Path], *, encoder: PretrainedEncoder, n_frames: int) -> np.ndarray:
    fe = encoder.processor.feature_extractor
    rate = int(fe.sampling_rate)
    fused = bool(getattr(getattr(encoder.model.config, "audio_config", None), "enable_fusion", False))
    mels, longer = [], []
    for path in paths:
        wave = real.load_audio(path, sampling_rate=rate)
        longer.append([fused and len(wave) > fe.nb_max_samples])
        # One call per clip under a fixed seed: the extractor crops long clips at random, and
        # this keeps each clip's crop the same whatever batch it lands in.
        with _numpy_seed(0):
            out = fe(wave, sampling_rate=rate, truncation="fusion" if fused else "rand_trunc", return_tensors="pt")
        mels.append(out["input_features"][0])
    # is_longer from the true lengths (the extractor marks a random clip "longer" when none is)
    feats = encoder.model.get_audio_features(input_features=torch.stack(mels).to(encoder.device),
                                             is_longer=torch.tensor(longer).to(encoder.device))
    return _unit(_pooled(feats))


@contextlib.contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


# ----------------------------------------------------------------------------- shared helpers

def _pooled(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected vector; 4 a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


def _cache_folder(cache_dir: str | Path | None, encoder: PretrainedEncoder, what: str, variant: str) -> Path | None:
    if cache_dir is None:
        return None
    return Path(cache_dir) / f"{encoder.kind.value}-{encoder.fingerprint}" / "-".join(filter(None, (what, variant)))


def _batched(inputs: list, *, keys: list[str], compute: Callable[[list], np.ndarray], batch_size: int,
             cache: Path | None, desc: str, progress: bool) -> np.ndarray:
    """Run `compute` batch by batch; with `cache`, batch b is `<start>-<digest of its keys>.npy`."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    parts = []
    for start in tqdm(range(0, len(inputs), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = inputs[start:start + batch_size]
        file = None
        if cache is not None:
            digest = hashlib.sha256("\n".join(keys[start:start + batch_size]).encode()).hexdigest()[:16]
            file = cache / f"{start:09d}-{digest}.npy"
            hit = _load_cached(file, rows=len(batch))
            if hit is not None:
                parts.append(hit)
                continue
        vecs = compute(batch)
        if file is not None:
            io.write_npy(file, vecs)
        parts.append(vecs)
    if not parts:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def _load_cached(file: Path, *, rows: int) -> np.ndarray | None:
    if not file.is_file():
        return None
    try:
        arr = np.load(file, allow_pickle=False)
    except Exception:  # a foreign or damaged file: recompute rather than fail
        return None
    return arr if arr.ndim == 2 and len(arr) == rows and np.isfinite(arr).all() else None


# ----------------------------------------------------------------------------- a whole dataset

def extract_features(*, dataset: schema.Dataset, root: str | Path, kind: str | EncoderKind, model_path: str | Path,
                     device: str = "auto", batch_size: int = 32, text_batch_size: int = 256, n_frames: int = 8,
                     cache_dir: str | Path | None = None, progress: bool = True) -> ExtractedFeatures:
    """Every item of a file-based dataset (media_path under `root`) and every reference caption."""
    task = dataset.task
    kind = _kind(kind)
    if task not in MODALITIES[kind]:
        raise ValueError(f"features.encoder={kind.value} cannot embed the {task} task; use "
                         + ("clap" if task == "audio" else "clip"))
    media = dataset.items["media_path"]
    if (media == "").any():
        first = dataset.items["item_id"][media == ""].iloc[0]
        raise schema.DataFormatError(f"{dataset.folder / 'items.tsv'}: item {first!r} has no media_path; "
                                     f"bring precomputed features instead (features.encoder=precomputed)")
    root = Path(root).expanduser().resolve()
    encoder = load_pretrained(kind=kind, model_path=model_path, device=device)
    items = encode_media([root / p for p in media], encoder=encoder, modality=task, batch_size=batch_size,
                         n_frames=n_frames, cache_dir=cache_dir, progress=progress)
    refs = dataset.captions[dataset.captions["kind"] == "reference"]
    captions = encode_texts(refs["text"].tolist(), encoder=encoder, batch_size=text_batch_size, cache_dir=cache_dir,
                            progress=progress)
    name = f"{type(encoder.model).__name__} ({encoder.path.name})"
    frames = f", {n_frames} frames mean-pooled" if task == "video" else ""
    meta = {"text_model": f"{name} text tower", "media_encoder": name + frames,
            "dataset_sha256": dataset.manifest["sha256"], "model_fingerprint": encoder.fingerprint}
    return ExtractedFeatures(items, refs["caption_id"].to_numpy(), captions, meta)
