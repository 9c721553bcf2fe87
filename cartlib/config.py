"""Typed configuration loaded from `params.yaml`, the single source of hyperparameters.

One frozen dataclass per `params.yaml` section. Loading is strict: an unknown key, a missing
section or a value of the wrong type raises a `ConfigError` that names the file and the key,
before any expensive work starts. `base.scale: smoke` applies the `smoke:` overrides, so the
tests run the same pipeline at a tiny size without a second copy of every value.
"""
from __future__ import annotations

import dataclasses
import enum
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("image", "audio", "video")


class ConfigError(ValueError):
    """params.yaml does not match the expected schema."""


class Scale(str, enum.Enum):
    DEFAULT = "default"
    SMOKE = "smoke"


@dataclass(frozen=True)
class BaseConfig:
    seed: int = 0  # one seed for every stage: same seed → same data, identifiers, metrics (CPU)
    device: str = "auto"  # auto | cpu | cuda; auto takes the GPU where present
    scale: Scale = Scale.DEFAULT  # smoke applies the `smoke:` overrides (tests, quick looks)
    tasks: tuple[str, ...] = TASKS  # the tasks DVC fans the stages out over


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"  # synthetic = the built-in benchmark; real datasets by name (issue 7)
    root: str = ""  # local folder of a real dataset; unused for synthetic
    n_train: int = 5000  # train items per task (their captions train the encoder and CART)
    n_test: int = 1000  # test gallery per task (Flickr30K's test gallery has 1K images)
    n_val: int = 500  # validation items, generated like the test gallery: in the corpus; their captions are the only queries any choice is tuned on
    n_captions: int = 5  # reference captions per item (test ones are the queries)
    n_pseudo: int = 2  # pseudo-captions per item from the imperfect captioner (caption enhancement)
    captioner_error_rate: float = 0.3  # chance that the captioner drops or confuses an attribute
    chunk_size: int = 1000  # items generated and written per chunk (bounded memory at 1M items)
    on_missing: str = "fail"  # real datasets: fail on a missing/unreadable media file, or skip and list it
    max_items: int = 0  # real datasets: keep at most this many items (0 = all), for a quick look


@dataclass(frozen=True)
class FeaturesConfig:
    text_batch_size: int = 256  # sentences per MiniLM forward pass
    epochs: int = 10  # media-tower training epochs (InfoNCE)
    batch_size: int = 256  # items per contrastive batch (negatives = the rest of the batch)
    lr: float = 2.0e-3  # AdamW learning rate of the media towers
    weight_decay: float = 1.0e-4
    temperature: float = 0.05  # initial InfoNCE temperature (learned, clamped to ≥ 0.01)
    width: int = 32  # base channel width of the media CNNs
    n_mels: int = 64  # audio log-mel bands
    encoder: str = "towers"  # towers (built-in benchmark) | clip | clap (local weights) | precomputed
    model_path: str = ""  # clip/clap: local HF model folder; precomputed: folder with items/captions tables


SCHEMES = ("cart", "atomic", "hierarchical_kmeans", "rqvae_only", "kmeans_unique", "random")


@dataclass(frozen=True)
class IdentifiersConfig:
    scheme: str = "cart"  # the scheme CART trains on (others are built for the comparison table)
    last_level: str = "nearest"  # nearest code at every RQ level + counter u (the paper) | balanced (last level by matching)
    compare: tuple[str, ...] = SCHEMES  # schemes built and health-checked side by side
    n_clusters: int = 64  # K of the coarse K-Means token (paper: UNKNOWN; sized to the gallery)
    n_levels: int = 2  # M fine RQ-VAE levels (TIGER uses 3; 2 suffice below ~10K items)
    codebook_size: int = 64  # codes per RQ-VAE level
    latent_dim: int = 32  # RQ-VAE latent width
    hidden_dim: int = 128  # RQ-VAE MLP width
    epochs: int = 20  # RQ-VAE training epochs
    lr: float = 0.002
    beta: float = 0.25  # commitment weight (standard VQ-VAE value)
    batch_size: int = 256
    seed: int = 0  # K-Means and RQ-VAE initialisation (not base.seed, which regenerates the benchmark)


@dataclass(frozen=True)
class CaptionsConfig:
    """The captioner of caption enhancement: pseudo-captions of every item, from its media (issue 14)."""

    captioner: str = "learned"  # learned (a small captioning model trained on the train split) | rules (teaching, ablation)
    epochs: int = 8  # captioner training epochs (chosen on validation items)
    batch_size: int = 128
    lr: float = 0.002
    d_model: int = 128  # captioner decoder width
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    prefix_length: int = 4  # ClipCap-style prefix: item vector → this many decoder input vectors
    decoding: str = "sample"  # sample (n_pseudo draws per item, fixed seed) | beam (the n_pseudo best beams)
    temperature: float = 0.3  # sampling temperature (chosen on validation items)
    max_length: int = 32  # tokens per pseudo-caption


@dataclass(frozen=True)
class TrainConfig:
    freeze_encoder: bool = True  # frozen MiniLM: its states are computed once, so epochs cost only the decoder
    fusion: bool = True  # CART's two-branch coarse-to-fine fusion; false = cross-attention to the last layer
    fusion_branches: str = "both"  # with fusion: both (CART) | coarse | fine (one branch, a control)
    match_fusion_params: bool = False  # a decoder without both branches gets the fused one's trainable-parameter count (wider FFN)
    caption_enhancement: bool = True  # pseudo-captions of every gallery item → its identifier
    consistency_weight: float = 1.0  # ω of the symmetric-KL (R-Drop) term; 0 = the ablation
    d_model: int = 256  # decoder width
    n_layers: int = 2  # decoder layers (the paper's decoder is "compact")
    n_heads: int = 4
    dropout: float = 0.1
    epochs: int = 8  # the most epochs trained (the learning-rate schedule spans them all)
    patience: int = 2  # stop after this many epochs without a better validation recall@1 (0 = never)
    batch_size: int = 128
    lr: float = 0.001
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    max_length: int = 48  # tokens per query (captions are ~25 tokens)
    refs_per_item: int = 0  # reference captions per train item used for training (0 = all); fewer = faster
    max_train_items: int = 0  # train items used (0 = all; the test gallery's pseudo-captions always are)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16
    seed: int = 0  # decoder initialisation, shuffles, dropout (not base.seed, which regenerates the benchmark)
    nproc: int = 1  # data-parallel worker processes (torch.distributed; one GPU each on CUDA)


@dataclass(frozen=True)
class EvaluateConfig:
    beam: int = 10  # beams kept per query; the ranked list is the beams in score order
    top_k: int = 10  # identifiers returned per query (≤ beam)
    batch_size: int = 256  # queries per decoding batch (and per search batch of every main-table system)
    speed_repeats: int = 3  # timed passes over the test queries behind the main table's queries/s (median)


@dataclass(frozen=True)
class GridConfig:
    """The schedule every ablation row shares, its `full` row included: overrides of `train` applied
    before the row's own (fewer train items, a narrower decoder, the epochs and patience), chosen on
    validation queries (`results/tuning/`) and stated in every grid table's caption; and the test
    queries every row is scored on."""

    train: dict = field(default_factory=dict)  # overrides of the `train` section for every grid row
    n_queries: int = 0  # test queries scored per row (0 = all), the same ones for every row


@dataclass(frozen=True)
class AblationsConfig:
    tasks: tuple[str, ...] = ("image",)  # the paper ablates on Flickr30K (image) alone; the full profile runs all three
    # row name -> overrides of the identifiers / train / evaluate sections (on top of grid.train)
    rows: dict = field(default_factory=lambda: {"full": {}})
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds (train.seed) of the seeded rows; the first alone for the others
    seeded_rows: tuple[str, ...] = ("full", "no_consistency", "no_fusion", "no_kmeans", "no_rqvae")  # the paper's rows


@dataclass(frozen=True)
class BaselinesConfig:
    """Non-generative rows of the main table (FAISS on the dual-tower features; pseudo-caption matching)."""

    ivf_nlist: int = 32  # IVF cells (≈ √N for a 1K gallery)
    ivf_nprobe: int = 4
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    fusion_weight: float = 0.5  # score = w · dual-tower + (1 − w) · pseudo-caption similarity
    repeats: int = 5  # timing repeats (median)


@dataclass(frozen=True)
class TsneConfig:
    task: str = "image"
    n_items: int = 1000  # test-gallery items plotted
    perplexity: float = 30.0
    n_top_clusters: int = 8  # coarse clusters coloured (the rest grey)


@dataclass(frozen=True)
class ThroughputConfig:
    """Figure 4 analogue: queries/s of CART decoding vs dual-tower and FAISS search as the gallery grows."""

    task: str = "image"  # whose trained decoder, identifier model and features seed the galleries
    sizes: tuple[int, ...] = (1000, 10000, 100000, 1000000)  # candidates per gallery
    batch_sizes: tuple[int, ...] = (1, 100)  # 1,024 too on a GPU
    beam: int = 10
    top_k: int = 10
    repeats: int = 3  # timed repeats after one warm-up; the median is reported
    hnsw_max_candidates: int = 100000  # HNSW is built up to this size (its build is slow on 2 cores)
    max_batch_seconds: float = 30.0  # skip a (system, size, batch) whose warm-up batch takes longer


@dataclass(frozen=True)
class Params:
    base: BaseConfig = field(default_factory=BaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    identifiers: IdentifiersConfig = field(default_factory=IdentifiersConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    ablations: AblationsConfig = field(default_factory=AblationsConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    tsne: TsneConfig = field(default_factory=TsneConfig)
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)
    source: str = "<defaults>"  # where these were loaded from (for error messages)

    @property
    def smoke(self) -> bool:
        return self.base.scale is Scale.SMOKE


SECTIONS: dict[str, type] = {
    "base": BaseConfig,
    "data": DataConfig,
    "features": FeaturesConfig,
    "captions": CaptionsConfig,
    "identifiers": IdentifiersConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "grid": GridConfig,
    "ablations": AblationsConfig,
    "baselines": BaselinesConfig,
    "tsne": TsneConfig,
    "throughput": ThroughputConfig,
}
OVERRIDABLE = ("identifiers", "train", "evaluate")  # sections an ablation row may override


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate `params.yaml`; apply the `smoke:` overrides when `base.scale` is smoke."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return params_from_dict(raw, source=str(path))


def params_from_dict(raw: dict[str, Any], *, source: str = "<dict>") -> Params:
    raw = dict(raw)
    smoke_overrides = raw.pop("smoke", {}) or {}
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(SECTIONS)} and 'smoke'")
    if not isinstance(smoke_overrides, dict):
        raise ConfigError(f"{source}: 'smoke' must be a mapping of section overrides")
    bad = set(smoke_overrides) - set(SECTIONS)
    if bad:
        raise ConfigError(f"{source}: unknown section(s) under 'smoke': {sorted(bad)}")
    sections = {name: _section(cls, raw.get(name) or {}, f"{source}: {name}") for name, cls in SECTIONS.items()}
    for name, over in smoke_overrides.items():  # validate overrides even when unused
        _section(SECTIONS[name], {**(raw.get(name) or {}), **(over or {})}, f"{source}: smoke.{name}")
    if sections["base"].scale is Scale.SMOKE:
        sections = {
            name: _section(cls, {**(raw.get(name) or {}), **(smoke_overrides.get(name) or {})}, f"{source}: {name}")
            for name, cls in SECTIONS.items()
        }
    params = Params(**sections, source=source)
    grid = with_overrides(params, {"train": params.grid.train}, where=f"{source}: grid")
    for name, row in params.ablations.rows.items():  # every row must be a valid override, before any work
        with_overrides(grid, row, where=f"{source}: ablations.rows.{name}")
    if not params.ablations.seeds or len(set(params.ablations.seeds)) != len(params.ablations.seeds):
        raise ConfigError(f"{source}: ablations.seeds must be distinct training seeds, at least one; "
                          f"got {list(params.ablations.seeds)}")
    return params


def with_overrides(params: Params, overrides: Any, *, where: str = "overrides") -> Params:
    """``params`` with ``{section: {key: value}}`` overrides applied (typed and range-checked)."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: expected a mapping of section overrides, got {overrides!r}")
    bad = set(overrides) - set(OVERRIDABLE)
    if bad:
        raise ConfigError(f"{where}: cannot override section(s) {sorted(bad)}; allowed: {list(OVERRIDABLE)}")
    changed = {}
    for name, over in overrides.items():
        current = dataclasses.asdict(getattr(params, name))
        changed[name] = _section(SECTIONS[name], {**current, **(over or {})}, f"{where}.{name}")
    return dataclasses.replace(params, **changed)


def _section(cls: type, values: Any, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    obj = cls(**kwargs)
    _check(obj, where)
    _check_train_eval(obj, where)
    return obj


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not one of {[m.value for m in hint]}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_rest) = typing.get_args(hint)
        return tuple(_coerce(v, inner, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _check(obj: Any, where: str) -> None:
    """Range checks that need more than a type."""
    if isinstance(obj, BaseConfig):
        bad = [t for t in obj.tasks if t not in TASKS]
        if bad or not obj.tasks:
            raise ConfigError(f"{where}.tasks: unknown task(s) {bad or '(empty)'}; expected a subset of {list(TASKS)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", obj.device):
            raise ConfigError(f"{where}.device: {obj.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:<index>'")
    if isinstance(obj, DataConfig):
        for name in ("n_train", "n_test", "n_captions", "chunk_size"):
            if getattr(obj, name) < 1:
                raise ConfigError(f"{where}.{name}: must be ≥ 1, got {getattr(obj, name)}")
        if obj.n_val < 0:
            raise ConfigError(f"{where}.n_val: must be ≥ 0, got {obj.n_val}")
        if obj.n_pseudo < 0:
            raise ConfigError(f"{where}.n_pseudo: must be ≥ 0, got {obj.n_pseudo}")
        if obj.on_missing not in ("fail", "skip"):
            raise ConfigError(f"{where}.on_missing: {obj.on_missing!r} is not one of ['fail', 'skip']")
        if obj.max_items < 0:
            raise ConfigError(f"{where}.max_items: must be ≥ 0 (0 = all), got {obj.max_items}")
        if not 0.0 <= obj.captioner_error_rate <= 1.0:
            raise ConfigError(f"{where}.captioner_error_rate: must lie in [0, 1], got {obj.captioner_error_rate}")
    if isinstance(obj, FeaturesConfig):
        for name in ("epochs", "batch_size", "text_batch_size", "width", "n_mels"):
            if getattr(obj, name) < 1:
                raise ConfigError(f"{where}.{name}: must be ≥ 1, got {getattr(obj, name)}")
        if obj.temperature <= 0:
            raise ConfigError(f"{where}.temperature: must be > 0, got {obj.temperature}")
        if obj.encoder not in ("towers", "clip", "clap", "precomputed"):
            raise ConfigError(f"{where}.encoder: {obj.encoder!r} is not one of ['towers', 'clip', 'clap', 'precomputed']")
        if obj.encoder != "towers" and not obj.model_path:
            raise ConfigError(f"{where}.model_path: required when features.encoder={obj.encoder!r}")
    if isinstance(obj, CaptionsConfig):
        if obj.captioner not in ("learned", "rules"):
            raise ConfigError(f"{where}.captioner: {obj.captioner!r} is not one of ['learned', 'rules']")
        if obj.decoding not in ("sample", "beam"):
            raise ConfigError(f"{where}.decoding: {obj.decoding!r} is not one of ['sample', 'beam']")
        for name in ("epochs", "batch_size", "d_model", "n_layers", "n_heads", "prefix_length", "max_length"):
            if getattr(obj, name) < 1:
                raise ConfigError(f"{where}.{name}: must be ≥ 1, got {getattr(obj, name)}")
        if obj.temperature <= 0:
            raise ConfigError(f"{where}.temperature: must be > 0, got {obj.temperature}")
    if isinstance(obj, IdentifiersConfig):
        if obj.last_level not in ("nearest", "balanced"):
            raise ConfigError(f"{where}.last_level: {obj.last_level!r} is not one of ['nearest', 'balanced']")
        bad = [x for x in (obj.scheme, *obj.compare) if x not in SCHEMES]
        if bad:
            raise ConfigError(f"{where}: unknown scheme(s) {bad}; expected one of {list(SCHEMES)}")
        for name in ("n_clusters", "n_levels", "latent_dim", "hidden_dim", "epochs", "batch_size"):
            if getattr(obj, name) < 1:
                raise ConfigError(f"{where}.{name}: must be ≥ 1, got {getattr(obj, name)}")
        if obj.codebook_size < 2:
            raise ConfigError(f"{where}.codebook_size: must be ≥ 2, got {obj.codebook_size}")


def _check_train_eval(obj: Any, where: str) -> None:
    if isinstance(obj, TrainConfig):
        for name in ("d_model", "n_layers", "n_heads", "epochs", "batch_size", "max_length"):
            if getattr(obj, name) < 1:
                raise ConfigError(f"{where}.{name}: must be ≥ 1, got {getattr(obj, name)}")
        if obj.d_model % obj.n_heads:
            raise ConfigError(f"{where}.d_model: {obj.d_model} is not divisible by n_heads={obj.n_heads}")
        if obj.consistency_weight < 0:
            raise ConfigError(f"{where}.consistency_weight: must be ≥ 0, got {obj.consistency_weight}")
        for name in ("refs_per_item", "max_train_items"):
            if getattr(obj, name) < 0:
                raise ConfigError(f"{where}.{name}: must be ≥ 0 (0 = all), got {getattr(obj, name)}")
        if obj.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"{where}.precision: {obj.precision!r} is not one of 'auto', 'fp32', 'bf16'")
        if obj.fusion_branches not in ("both", "coarse", "fine"):
            raise ConfigError(f"{where}.fusion_branches: {obj.fusion_branches!r} is not one of 'both', 'coarse', 'fine'")
        if obj.patience < 0:
            raise ConfigError(f"{where}.patience: must be ≥ 0 (0 = train every epoch), got {obj.patience}")
        if obj.nproc < 1:
            raise ConfigError(f"{where}.nproc: must be ≥ 1 (worker processes), got {obj.nproc}")
    if isinstance(obj, GridConfig):
        if not isinstance(obj.train, dict):
            raise ConfigError(f"{where}.train: expected a mapping of `train` keys, got {obj.train!r}")
        if obj.n_queries < 0:
            raise ConfigError(f"{where}.n_queries: must be ≥ 0 (0 = all test queries), got {obj.n_queries}")
    if isinstance(obj, AblationsConfig):
        bad = [t for t in obj.tasks if t not in TASKS]
        if bad or not obj.tasks:
            raise ConfigError(f"{where}.tasks: unknown task(s) {bad or '(empty)'}; expected a subset of {list(TASKS)}")
        if not isinstance(obj.rows, dict) or not obj.rows:
            raise ConfigError(f"{where}.rows: expected a non-empty mapping of row name -> overrides")
    if isinstance(obj, TsneConfig):
        if obj.task not in TASKS:
            raise ConfigError(f"{where}.task: {obj.task!r} is not one of {list(TASKS)}")
        if obj.n_items < 10 or obj.perplexity <= 0 or obj.n_top_clusters < 1:
            raise ConfigError(f"{where}: n_items ≥ 10, perplexity > 0, n_top_clusters ≥ 1")
    if isinstance(obj, ThroughputConfig):
        if obj.task not in TASKS:
            raise ConfigError(f"{where}.task: {obj.task!r} is not one of {list(TASKS)}")
        if not obj.sizes or min(obj.sizes) < 1 or not obj.batch_sizes or min(obj.batch_sizes) < 1:
            raise ConfigError(f"{where}: sizes and batch_sizes must be non-empty lists of integers ≥ 1")
        if obj.beam < 1 or obj.top_k < 1 or obj.top_k > obj.beam or obj.repeats < 1:
            raise ConfigError(f"{where}: need beam ≥ 1, 1 ≤ top_k ≤ beam, repeats ≥ 1")
    if isinstance(obj, BaselinesConfig):
        if not 0.0 <= obj.fusion_weight <= 1.0:
            raise ConfigError(f"{where}.fusion_weight: must be in [0, 1], got {obj.fusion_weight}")
        for name in ("ivf_nlist", "ivf_nprobe", "hnsw_m", "hnsw_ef_search", "repeats"):
            if getattr(obj, name) < 1:
                raise ConfigError(f"{where}.{name}: must be ≥ 1, got {getattr(obj, name)}")
    if isinstance(obj, EvaluateConfig):
        if obj.beam < 1 or obj.top_k < 1 or obj.batch_size < 1 or obj.speed_repeats < 1:
            raise ConfigError(f"{where}: beam, top_k, batch_size and speed_repeats must be ≥ 1")
        if obj.top_k > obj.beam:
            raise ConfigError(f"{where}.top_k: {obj.top_k} exceeds beam={obj.beam} (the ranked list is the beams)")


def check_task(task: str, params: Params | None = None) -> str:
    """Raise a clear error for an unknown task (before any expensive work)."""
    allowed = params.base.tasks if params is not None else TASKS
    if task not in allowed:
        raise ConfigError(f"unknown task {task!r}; expected one of {list(allowed)}")
    return task


def resolve_device(device: str) -> str:
    """``base.device`` → the torch device this process uses (:func:`cartlib.devices.resolve_device`)."""
    from cartlib.devices import resolve_device as resolve

    return resolve(device)
