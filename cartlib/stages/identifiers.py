"""Stage `identifiers`: build every identifier scheme on the item features, with its health.

CART's last RQ level follows `identifiers.last_level` (nearest: the paper's rule, `u` counts the
items sharing `(k, v_1..v_M)`; balanced: the ablation), as do the RQ-VAE-only scheme's."""
from __future__ import annotations

from typing import NamedTuple

import pandas as pd

from cartlib import viz
from cartlib.config import Params, check_task, resolve_device
from cartlib.data import schema
from cartlib.data.features import load_features
from cartlib.data.idstore import save_identifiers
from cartlib.ids import build_identifier_model, identifier_health
from cartlib.paths import TaskPaths
from cartlib.results import publish


class IdentifiersStageResult(NamedTuple):
    codes: dict  # scheme → (N, L) codes
    health: pd.DataFrame  # one row per scheme
    metrics: dict  # the default scheme's health
    figures: dict
    mlflow_run_id: str | None


def run(params: Params, paths: TaskPaths, *, progress: bool = True) -> IdentifiersStageResult:
    check_task(paths.task, params)
    cfg = params.identifiers
    dataset = schema.load_dataset(paths.dataset, verify_hashes=False)
    feats = load_features(paths.features, dataset)
    if cfg.n_clusters > len(feats.items):
        raise ValueError(f"identifiers.n_clusters={cfg.n_clusters} exceeds the {len(feats.items)} items")
    schemes = list(dict.fromkeys([cfg.scheme, *cfg.compare]))  # the default first
    codes, rows = {}, []
    for scheme in schemes:
        model = build_identifier_model(scheme, n_clusters=cfg.n_clusters, n_levels=cfg.n_levels,
                                       codebook_size=cfg.codebook_size, latent_dim=cfg.latent_dim,
                                       hidden_dim=cfg.hidden_dim, epochs=cfg.epochs, lr=cfg.lr, beta=cfg.beta,
                                       batch_size=cfg.batch_size, last_level=cfg.last_level,
                                       seed=params.identifiers.seed,
                                       device=resolve_device(params.base.device), progress=progress)
        model.fit(feats.items)
        health = identifier_health(model.codes_, model.level_sizes_, has_unique_token=model.has_unique_token,
                                   reconstruction_rel_error=model.reconstruction_rel_error_,
                                   fit_seconds=model.fit_seconds_)
        save_identifiers(paths.root / "data" / paths.task / "identifiers", scheme=scheme, codes=model.codes_,
                         item_ids=feats.item_ids, level_sizes=model.level_sizes_,
                         has_unique_token=model.has_unique_token, meta={"config": cfg.__dict__, "health": health})
        codes[scheme] = model.codes_
        rows.append({"scheme": scheme, "level_sizes": "×".join(map(str, model.level_sizes_)), **health})
    table = pd.DataFrame(rows)
    usage = pd.DataFrame([{"scheme": r["scheme"], "level": int(k.rsplit("l", 1)[1]), "code_usage": r[k]}
                          for r in rows for k in r if k.startswith("code_usage_l")])
    figures = {
        "code_usage": viz.code_usage(usage, title=f"{paths.task}: codebook usage per level"),
        "cluster_sizes": viz.cluster_sizes(codes[cfg.scheme], title=f"{paths.task}: {cfg.scheme} identifiers"),
    }
    # the default scheme's health: collision_rate, max_items_per_prefix, unique_token_p99, the level
    # sizes (level_size_l<i>; the last is u's: the largest number of items sharing a prefix), …
    metrics = {k: v for k, v in rows[0].items() if isinstance(v, (int, float))}
    metrics["level_sizes"] = rows[0]["level_sizes"]
    run_id = publish(paths, "identifiers", params=params, metrics=metrics, tables={"schemes": table},
                     figures=figures)
    return IdentifiersStageResult(codes, table, metrics, figures, run_id)
