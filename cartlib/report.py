"""Stage `report`: the main and ablation tables and ``results/REPORT.md``, from the stages' results.

Reads only what the other stages wrote (``results/**/metrics.json`` with its ``timings.json``, the
per-query ``run.tsv`` files, tables with their ``.timings.tsv``; see ``cartlib.results``), the qrels
and ``dvc.lock``; computes nothing expensive. Every claim of the paper gets our evidence, the
paper's number beside ours, absolute and relative, and a verdict by the rules of
:mod:`cartlib.stats`: a claim about two systems is decided on the paired difference of their
per-query hit@1 over the same test queries, with a 95% two-level paired bootstrap interval (seeds,
then queries); *holds* / *refuted* only when the interval excludes 0 (or, for "adds little", lies
within ±1 pt), otherwise *inconclusive*.

**Rows and seeds.** A row (a system: the CART run, a baseline, a row of the grid)
is one or more run files, one per training seed, beside the row's ``metrics.json``::

    <row folder>/<run file>            the run of params.yaml's base.seed
    <row folder>/seed_<s>/<run file>   the same row trained and evaluated with seed <s>

with ``<row folder>`` e.g. ``results/evaluate/<task>``, ``results/ablations/<task>/<row>``,
``results/baselines/<task>`` and ``<run file>`` ``run.tsv`` (``runs/<system>.tsv.gz`` for the
baselines). A ``seed_<base.seed>`` folder replaces the top-level file. Every seed of a row must score
the same queries; the comparison keeps the queries all runs of both rows scored.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cartlib import io, stats
from cartlib.config import Params
from cartlib.convergence import FLAT_TOLERANCE, PLATEAUS, Plateau, parse_curve, plateau_state, recent_gain
from cartlib.metrics import applicable
from cartlib.stats import Kind, PairedCI, Verdict

METRICS = ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10")
CUTOFF = {"recall_at_1": 1, "recall_at_5": 5, "recall_at_10": 10, "mrr_at_10": 10}
SCHEME_NAMES = {
    "cart": "CART identifiers (K-Means + RQ-VAE + u)",
    "atomic": "atomic ids (GRACE-style)",
    "hierarchical_kmeans": "hierarchical K-Means (DSI-style)",
    "rqvae_only": "RQ-VAE only (TIGER-style)",
    "kmeans_unique": "K-Means + u",
    "random": "random codes",
}
# the paper's Flickr30K ablation (R@1 / R@10 / MRR@10, %), CART.md "Reported results"
PAPER_ABLATION = {
    "full": (81.78, 98.38, 88.04),
    "no_consistency": (81.64, 98.04, 87.85),
    "no_fusion": (75.54, 96.72, 83.11),
    "no_kmeans": (79.50, 97.52, 86.12),
    "no_rqvae": (76.22, 96.16, 83.31),
}
# the paper's Table 4 rows by the size of their drop (largest first); caption enhancement is not among them
PAPER_RANKED = ("no_fusion", "no_rqvae", "no_kmeans", "no_consistency")
ROW_NAMES = {"no_fusion": "fusion", "no_rqvae": "RQ-VAE", "no_kmeans": "K-Means", "no_consistency": "consistency loss",
             "no_caption_enhancement": "caption enhancement"}
PAPER_MAIN = {  # task: (dataset, best dual-tower R@1, CART R@1)
    "image": ("Flickr30K", 74.9, 81.8),
    "audio": ("Clotho", 22.4, 46.4),
    "video": ("MSR-VTT", 49.3, 52.6),
}
PAPER_GRACE = ("Flickr30K", 68.4, 81.78)  # GRACE (atomic ids, another model) vs CART, R@1 %
# the stages whose results the report reads: their dvc.lock entries identify what produced them
READS = ("features", "train", "evaluate", "baselines", "ablations", "tsne", "throughput")
CLAIM_COLUMNS = ["claim", "task", "ours", "kind", "delta", "ci_low", "ci_high", "rel_delta", "n_queries", "n_seeds",
                 "paper", "paper_delta", "paper_rel_delta", "verdict", "evidence"]
KIND_TEXT = {Kind.HIGHER: "Δ > 0", Kind.LOWER: "Δ < 0", Kind.EQUIVALENT: "|Δ| ≤ 0.01", Kind.RANKING: "gaps > 0"}


class ReportResult(NamedTuple):
    main: pd.DataFrame
    ablations: pd.DataFrame
    claims: pd.DataFrame
    markdown: str


class Provenance(NamedTuple):
    inputs_sha256: str | None  # sha256 of the READS stages' deps (path, md5) and params in dvc.lock
    n_stages: int
    commit: str | None  # the commit that recorded these dvc.lock entries (None: not committed, or no git)
    note: str


def _json(path: Path) -> dict | None:
    return io.read_json(path) if path.exists() else None


def _measured(metrics_path: Path) -> dict | None:
    """A stage's metrics.json with its timings.json beside it (speeds live there); None if no metrics."""
    m = _json(metrics_path)
    return None if m is None else {**m, **(_json(metrics_path.with_name("timings.json")) or {})}


def _table(path: Path) -> pd.DataFrame | None:
    """A stage's `<name>.tsv` with the measurement columns of `<name>.timings.tsv` (same rows, same order)."""
    if not path.exists():
        return None
    frame = pd.read_csv(path, sep="\t")
    timings = path.with_suffix(".timings.tsv")
    if timings.exists():
        t = pd.read_csv(timings, sep="\t")
        frame = pd.concat([frame, t[[c for c in t.columns if c not in frame.columns]]], axis=1)
    return frame


def _number(v) -> float:
    """A metric as a float; None (not applicable, JSON null) → NaN."""
    return float("nan") if v is None else float(v)


def read_run(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"query_id": str, "item_id": str}, keep_default_na=False)


def hits_at_1(run_path: Path, qrels: pd.DataFrame) -> pd.Series:
    """Per query of the run: 1.0 if its rank-1 item is relevant (run.tsv contract), indexed by query_id
    (sorted). Queries of the run with no rank-1 row count as misses; queries not in the run are left out."""
    run = read_run(run_path)
    queries = pd.Index(sorted(set(run["query_id"]) & set(qrels["query_id"])), name="query_id")
    top = run.loc[run["rank"] == 1, ["query_id", "item_id"]]
    hit = top.merge(qrels[["query_id", "item_id"]].drop_duplicates(), on=["query_id", "item_id"])["query_id"]
    return pd.Series(queries.isin(set(hit)).astype(float), index=queries)


def seed_runs(folder: Path, name: str, base_seed: int) -> dict[int, Path]:
    """The run files of one row, by seed (see the module docstring): ``folder/name`` for ``base_seed``
    and ``folder/seed_<s>/name`` or ``folder/seeds/seed_<s>/name`` (the ablation stage's) for each
    other seed that has one."""
    runs = {base_seed: folder / name} if (folder / name).exists() else {}
    dirs = [*folder.glob("seed_*"), *(folder / "seeds").glob("seed_*")] if folder.is_dir() else []
    for d in sorted(dirs):
        m = re.fullmatch(r"seed_(\d+)", d.name)
        if m and (d / name).exists():
            runs[int(m.group(1))] = d / name
    return dict(sorted(runs.items()))


class Evidence:
    """Per-query hits of the rows of one results tree, read once, and the paired intervals between them."""

    def __init__(self, root: Path, params: Params, *, n_resamples: int = stats.DEFAULT_RESAMPLES):
        self.root, self.params, self.n_resamples = Path(root), params, n_resamples
        self._qrels: dict[str, pd.DataFrame | None] = {}
        self._hits: dict[Path, pd.Series] = {}
        self._cis: dict[tuple, PairedCI | None] = {}

    def qrels(self, task: str) -> pd.DataFrame | None:
        if task not in self._qrels:
            path = self.root / "data" / task / "qrels.tsv"
            self._qrels[task] = pd.read_csv(path, sep="\t", dtype=str) if path.exists() else None
        return self._qrels[task]

    def hits(self, task: str, folder: str, name: str = "run.tsv", *,
             seeds: tuple[int, ...] | None = None) -> list[pd.Series]:
        """hit@1 per query of each seed's run of the row ``results/<folder>`` ([] if none or no qrels);
        only the runs of ``seeds`` when given."""
        qrels = self.qrels(task)
        if qrels is None:
            return []
        out = []
        for seed, path in seed_runs(self.root / "results" / folder, name, self.params.base.seed).items():
            if seeds is not None and seed not in seeds:
                continue
            if path not in self._hits:
                self._hits[path] = hits_at_1(path, qrels)
            out.append(self._hits[path])
        return out

    def compare(self, task: str, a: tuple[str, ...], b: tuple[str, ...], *,
                b_seeds: tuple[int, ...] | None = None) -> PairedCI | None:
        """Paired interval of mean hit@1 of row ``a`` − row ``b`` (each ``(folder[, run file])`` under
        results/), ``b`` restricted to the runs of ``b_seeds`` when given; None when either has no run."""
        key = (task, a, b, b_seeds)
        if key not in self._cis:
            ha, hb = self.hits(task, *a), self.hits(task, *b, seeds=b_seeds)
            self._cis[key] = stats.compare(ha, hb, n_resamples=self.n_resamples) if ha and hb else None
        return self._cis[key]

    def run_depth(self, task: str, folder: str, name: str = "run.tsv") -> int | None:
        """The deepest rank of the row's base-seed run (the list length it was cut at)."""
        path = self.root / "results" / folder / name
        return int(read_run(path)["rank"].max()) if path.exists() else None


def _claim(claim: str, task: str, ours: str, kind: Kind, ci: PairedCI | None, reference: float, paper: str,
           paper_delta: float, paper_reference: float, evidence: str, verdict: Verdict | None = None,
           shown: PairedCI | None = None) -> dict:
    """One claims row; ``shown`` (default ``ci``) is the interval displayed, ``verdict`` overrides the rule's."""
    shown = shown if shown is not None else ci
    return {"claim": claim, "task": task, "ours": ours, "kind": KIND_TEXT[kind],
            "delta": shown.delta if shown else float("nan"), "ci_low": shown.low if shown else float("nan"),
            "ci_high": shown.high if shown else float("nan"),
            "rel_delta": stats.relative(shown.delta, reference) if shown else float("nan"),
            "n_queries": shown.n_queries if shown else 0,
            "n_seeds": f"{shown.n_seeds_a} / {shown.n_seeds_b}" if shown else "",
            "paper": paper, "paper_delta": paper_delta,
            "paper_rel_delta": stats.relative(paper_delta, paper_reference),
            "verdict": str(verdict if verdict is not None else stats.verdict(kind, ci)), "evidence": evidence}


def _other_claim(claim: str, task: str, ours: str, paper: str, verdict: str, evidence: str) -> dict:
    """A claim without a paired per-query comparison (a measurement ratio, a figure)."""
    return {**_claim(claim, task, ours, Kind.HIGHER, None, float("nan"), paper, float("nan"), float("nan"),
                     evidence, verdict=Verdict(verdict)), "kind": "—"}


SPEED = ("queries_per_second_with_encoding", "queries_per_second_without_encoding")


def main_table(root: Path, params: Params) -> pd.DataFrame:
    """Per task: the dual tower, the baselines stage's systems and the main CART run on all test queries,
    with queries/s measured like for like by the evaluate stage (``speed.tsv``: the same batches, with
    and without query encoding; :mod:`cartlib.bench.main_speed`)."""
    rows = []
    for task in params.base.tasks:
        res = root / "results"
        dual = _json(res / "features" / task / "metrics.json")
        systems = _table(res / "baselines" / task / "systems.tsv")
        baseline_rows = systems.to_dict("records") if systems is not None else []
        speed = _table(res / "evaluate" / task / "speed.tsv")
        rates = ({r["system"]: {k: r.get(k) for k in SPEED} for r in speed.to_dict("records")}
                 if speed is not None else {})
        if dual:
            rows.append({"task": task, "system": "dual-tower (our encoder), exact", "schedule": "—", **dual,
                         **rates.get("dual_tower_exact", {})})
        for r in baseline_rows:
            if r["system"] != "dual_tower_exact":
                rows.append({"task": task, **{k: v for k, v in r.items() if k not in SPEED},
                             "system": r["description"], "schedule": "—", **rates.get(r["system"], {})})
        cart = _measured(res / "evaluate" / task / "metrics.json")
        if cart:
            rows.append({"task": task, "system": "**CART** (main run)", "schedule": "main", **cart,
                         **rates.get("cart", {})})
    cols = ["task", "system", "schedule", *METRICS, *SPEED, "n_queries", "n_candidates"]
    frame = pd.DataFrame(rows)
    frame = frame.reindex(columns=cols) if len(frame) else pd.DataFrame(columns=cols)
    for c in (*METRICS, *SPEED):  # null (not applicable) → NaN → an empty cell
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype(float)
    return frame


# the grid rows that are identifier schemes (the same models as the ablations: trained once, shown twice)
SCHEME_ROWS = {"full": "cart", "no_kmeans": "rqvae_only", "no_rqvae": "hierarchical_kmeans", "atomic": "atomic"}


def ablation_table(root: Path, params: Params, evidence: Evidence | None = None) -> pd.DataFrame:
    """One row per grid row and task of ``ablations.tasks``: its metrics (empty where its lists are
    shorter than the cut-off), its trainable parameters and epochs, the change against the task's full
    row with the paired 95% interval of the R@1 change, absolute and relative to the full row, and the
    paper's changes beside them."""
    ev = evidence or Evidence(root, params)
    rows = []
    for task in params.ablations.tasks:
        rows += _ablation_rows(root, params, ev, task)
    cols = ["task", "row", "overrides", "level_sizes", "beam", "trainable_params", "n_seeds", "epochs", "best_epoch",
            "recall_at_1", "recall_at_10", "mrr_at_10",
            "delta_recall_at_1", "delta_r1_ci95_low", "delta_r1_ci95_high", "rel_delta_recall_at_1",
            "delta_recall_at_10", "delta_mrr_at_10", "paper_delta_r1", "paper_rel_delta_r1", "paper_delta_r10",
            "paper_delta_mrr10"]
    return pd.DataFrame(rows).reindex(columns=cols) if rows else pd.DataFrame(columns=cols)


def scheme_table(abl: pd.DataFrame) -> pd.DataFrame:
    """The identifier-scheme rows of the grid (CART, RQ-VAE only, hierarchical K-Means, atomic): the same
    runs as the ablation rows ``SCHEME_ROWS``, named by their scheme."""
    cols = ["task", "identifiers", "row", "level_sizes", "n_seeds", "recall_at_1", "recall_at_10", "mrr_at_10",
            "delta_recall_at_1", "delta_r1_ci95_low", "delta_r1_ci95_high"]
    if not len(abl):
        return pd.DataFrame(columns=cols)
    out = abl[abl["row"].isin(list(SCHEME_ROWS))].copy()
    out["identifiers"] = out["row"].map(lambda r: SCHEME_NAMES[SCHEME_ROWS[r]])
    return out.reindex(columns=cols).reset_index(drop=True)


def _same_models(row_seeds: pd.DataFrame | None, full_seeds: pd.DataFrame | None) -> tuple[int, ...] | None:
    """The seeds of a row that evaluates the full row's own models (the beam rows: the same model key per
    seed) on fewer seeds than the full row has; None for a row that trains its own models. Such a row is
    compared with the full row's runs of the same seeds, so the seed-to-seed spread of the full row is not
    mistaken for the row's effect."""
    cols = {"seed", "model_key"}
    if row_seeds is None or full_seeds is None or not (cols <= set(row_seeds) and cols <= set(full_seeds)):
        return None
    full_key = dict(zip(full_seeds["seed"].astype(int), full_seeds["model_key"]))
    row_key = dict(zip(row_seeds["seed"].astype(int), row_seeds["model_key"]))
    if row_key and all(full_key.get(s) == k for s, k in row_key.items()) and set(row_key) != set(full_key):
        return tuple(sorted(row_key))
    return None


def _ablation_rows(root: Path, params: Params, ev: Evidence, task: str) -> list[dict]:
    base = root / "results" / "ablations" / task
    full = _json(base / "full" / "metrics.json")
    full_seeds = _table(base / "full" / "seeds" / "seeds.tsv")
    rows = []
    for row, overrides in params.ablations.rows.items():
        m = _json(base / row / "metrics.json")
        if m is None:
            continue
        depth = ev.run_depth(task, f"ablations/{task}/{row}")
        values = {k: _number(m.get(k)) for k in ("recall_at_1", "recall_at_10", "mrr_at_10")}
        for k in values:  # a row whose lists are shorter than the cut-off has no such metric
            if depth is not None and not applicable(CUTOFF[k], depth, m.get("n_candidates")):
                values[k] = float("nan")
        seeds = _table(base / row / "seeds" / "seeds.tsv")
        epochs = (lambda c: "" if seeds is None or c not in seeds else
                  "/".join(str(int(v)) for v in seeds[c].dropna()))
        rec = {"task": task, "row": row, "overrides": json.dumps(overrides, sort_keys=True),
               "level_sizes": m.get("level_sizes"), "beam": m.get("beam"),
               "trainable_params": m.get("trainable_params"),
               "n_seeds": len(ev.hits(task, f"ablations/{task}/{row}")),
               "epochs": epochs("train_epochs"), "best_epoch": epochs("best_epoch"), **values}
        same = _same_models(seeds, full_seeds) if row != "full" else None
        reference = ({k: full_seeds.loc[full_seeds["seed"].astype(int).isin(same), k].mean() if k in full_seeds
                      else float("nan") for k in values} if same else
                     {k: _number(full.get(k)) for k in values} if full else None)
        if reference:
            for k in values:
                rec[f"delta_{k}"] = values[k] - reference[k]
            rec["rel_delta_recall_at_1"] = stats.relative(rec["delta_recall_at_1"], reference["recall_at_1"])
        ci = (ev.compare(task, (f"ablations/{task}/{row}",), (f"ablations/{task}/full",), b_seeds=same)
              if row != "full" else None)
        rec["delta_r1_ci95_low"] = ci.low if ci else float("nan")
        rec["delta_r1_ci95_high"] = ci.high if ci else float("nan")
        paper = PAPER_ABLATION.get(row)
        if paper:
            full_p = PAPER_ABLATION["full"]
            rec["paper_delta_r1"] = round((paper[0] - full_p[0]) / 100, 4)
            rec["paper_rel_delta_r1"] = round((paper[0] - full_p[0]) / full_p[0], 4)
            rec["paper_delta_r10"] = round((paper[1] - full_p[1]) / 100, 4)
            rec["paper_delta_mrr10"] = round((paper[2] - full_p[2]) / 100, 4)
        rows.append(rec)
    return rows


def _fmt_ci(ci: PairedCI | None) -> str:
    return "no run" if ci is None else f"{ci.delta:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]"


def _mean(hits: list[pd.Series]) -> float:
    return float(np.mean([h.mean() for h in hits])) if hits else float("nan")


def _ranking_claim(ev: Evidence, abl_task: str, position: int, means: dict[str, float],
                   full_r1: float, note: str) -> dict:
    """"Removing ``PAPER_RANKED[position]`` costs the (position+1)-th largest drop of the paper's four":
    the row must score above the rows the paper ranks before it and below those after it. Tested on the
    gaps to its nearest competitors in our data (the ones that could break the order) and on its own
    drop; each interval oriented so that the paper's order means > 0."""
    row = PAPER_RANKED[position]
    claim = ("Fusion matters most (largest drop when removed, among the paper's four ablations)" if position == 0
             else f"The {ROW_NAMES[row]} matters next (drop ranked {position + 1} of the paper's four)")
    missing = _claim(claim, abl_task, "needs the row and at least one other of the paper's four ablation rows",
                     Kind.RANKING, None, full_r1, "", float("nan"), float("nan"), "results/tables/ablations.md")
    if row not in means or len(means) < 2:
        return missing
    folder = lambda r: (f"ablations/{abl_task}/{r}",)
    others = sorted((r for r in means if r != row), key=lambda r: (means[r], r))  # largest drop first
    gaps = []  # (competitor, sign, CI of sign · (row − competitor)): the paper's order means > 0
    if position >= 1 and len(others) >= position:  # the rows ranked before it must score lower
        above = others[position - 1]
        gaps.append((above, 1, ev.compare(abl_task, folder(row), folder(above))))
    if position < len(others):  # the rows ranked after it must score higher
        below = others[position]
        gaps.append((below, -1, ev.compare(abl_task, folder(below), folder(row))))
    drop = ev.compare(abl_task, folder(row), folder("full"))
    if not gaps or drop is None or any(c is None for *_, c in gaps):
        return missing
    oriented_drop = drop._replace(delta=-drop.delta, low=-drop.high, high=-drop.low)
    shown_name, sign, shown = min(gaps, key=lambda g: g[2].low)  # the weakest link of the order
    paper = lambda r: PAPER_ABLATION[r][0]
    paper_gap = sign * (paper(row) - paper(shown_name)) / 100
    name = lambda r: f"w/o {ROW_NAMES.get(r, r)} {means[r]:.3f}"
    gap_text = "; ".join(f"{name(row) if s > 0 else name(r)} − {name(r) if s > 0 else name(row)}: {_fmt_ci(c)}"
                         for r, s, c in gaps)
    return _claim(claim, abl_task,
                  f"{gap_text}; w/o {ROW_NAMES[row]} − full {full_r1:.3f}: {_fmt_ci(drop)}{note}",
                  Kind.RANKING, None, full_r1,
                  f"w/o {ROW_NAMES[row]} {paper(row):.2f}, w/o {ROW_NAMES[shown_name]} {paper(shown_name):.2f}, "
                  f"full {paper('full'):.2f}", paper_gap, PAPER_ABLATION["full"][0] / 100,
                  "results/tables/ablations.md",
                  verdict=stats.verdict(Kind.RANKING, [c for *_, c in gaps] + [oriented_drop]), shown=shown)


def _ablation_claims(ev: Evidence, t: str) -> list[dict]:
    """The paper's Table 4 claims on task ``t`` of the grid (Δ = ablated − full), plus fusion at equal
    trainable parameters (the `no_fusion_matched` row)."""
    claims: list[dict] = []
    folder = lambda r: (f"ablations/{t}/{r}",)
    full_hits = ev.hits(t, *folder("full"))
    if not full_hits:
        return claims
    full_r1 = _mean(full_hits)
    means = {r: _mean(ev.hits(t, *folder(r))) for r in PAPER_RANKED if ev.hits(t, *folder(r))}
    extra = {r: _mean(ev.hits(t, *folder(r))) for r in ("no_caption_enhancement",) if ev.hits(t, *folder(r))}
    note = "".join(f"; not in the paper's table: w/o {ROW_NAMES[r]} {v:.3f} ({v - full_r1:+.3f})"
                   for r, v in extra.items() if means and v < min(means.values()))
    for position in (0, 1):
        claims.append(_ranking_claim(ev, t, position, means, full_r1, note if position == 0 else ""))
    paper_drop = lambda r: ((PAPER_ABLATION[r][0] - PAPER_ABLATION["full"][0]) / 100 if r in PAPER_ABLATION
                            else float("nan"))
    for row, claim, kind in (("no_kmeans", "The K-Means coarse token helps", Kind.LOWER),
                             ("no_fusion_matched", "(not in the paper) Fusion helps at equal trainable parameters "
                                                   "(plain cross-attention with a wider FFN)", Kind.LOWER),
                             ("no_caption_enhancement", "Caption enhancement helps", Kind.LOWER),
                             ("no_consistency", "The consistency loss adds little (the R@1 change lies within "
                                                "±1 pt)", Kind.EQUIVALENT)):
        ci = ev.compare(t, folder(row), folder("full"))
        paper = (f"w/o {PAPER_ABLATION[row][0]:.2f} vs full {PAPER_ABLATION['full'][0]:.2f}"
                 if row in PAPER_ABLATION else "not reported")
        ours = (f"w/o {_mean(ev.hits(t, *folder(row))):.3f} vs full {full_r1:.3f}" if ci else
                f"no run of the ablation row `{row}`")
        claims.append(_claim(claim, t, ours, kind, ci, full_r1, paper, paper_drop(row),
                             PAPER_ABLATION["full"][0] / 100, "results/tables/ablations.md"))
    return claims


def claims_table(root: Path, params: Params, main: pd.DataFrame, abl: pd.DataFrame,
                 evidence: Evidence | None = None) -> pd.DataFrame:
    ev = evidence or Evidence(root, params)
    res = root / "results"
    claims = []
    # 1. CART beats the dual-tower baseline (paper Table 2/3), and (not in the paper) the dual tower fused
    #    with pseudo-caption matching, which uses the same pseudo-captions without generation
    for task in params.base.tasks:
        ci = ev.compare(task, (f"evaluate/{task}",), (f"features/{task}",))
        if ci:
            dataset, dual_p, cart_p = PAPER_MAIN.get(task, ("—", float("nan"), float("nan")))
            claims.append(_claim(
                "CART beats the dual-tower baseline (R@1)", task,
                f"{_mean(ev.hits(task, f'evaluate/{task}')):.3f} vs {_mean(ev.hits(task, f'features/{task}')):.3f}",
                Kind.HIGHER, ci, _mean(ev.hits(task, f"features/{task}")), f"{dataset}: {cart_p} vs {dual_p}",
                (cart_p - dual_p) / 100, dual_p / 100,
                f"results/evaluate/{task}/run.tsv vs results/features/{task}/run.tsv"))
    for task in params.base.tasks:
        fused = (f"baselines/{task}", "runs/pseudo_caption_fused.tsv.gz")
        if not ev.hits(task, f"evaluate/{task}"):
            continue
        ci = ev.compare(task, (f"evaluate/{task}",), fused)
        ours = (f"{_mean(ev.hits(task, f'evaluate/{task}')):.3f} vs {_mean(ev.hits(task, *fused)):.3f}" if ci else
                f"no run file results/baselines/{task}/runs/pseudo_caption_fused.tsv.gz (rerun the baselines stage)")
        claims.append(_claim(
            "(not in the paper) CART beats dual-tower + pseudo-caption matching (same pseudo-captions, "
            "no generation)", task, ours, Kind.HIGHER, ci, _mean(ev.hits(task, *fused)), "not reported",
            float("nan"), float("nan"),
            f"results/evaluate/{task}/run.tsv vs results/baselines/{task}/runs/pseudo_caption_fused.tsv.gz"))
    # 2. vs atomic identifiers (GRACE), in our model: the grid's atomic row against its full row
    for task in params.ablations.tasks:
        a, c = (f"ablations/{task}/atomic",), (f"ablations/{task}/full",)
        ci = ev.compare(task, c, a)
        if ci:
            claims.append(_claim(
                "CART identifiers beat atomic identifiers (GRACE) in the same model", task,
                f"{_mean(ev.hits(task, *c)):.3f} vs {_mean(ev.hits(task, *a)):.3f}", Kind.HIGHER, ci,
                _mean(ev.hits(task, *a)),
                f"{PAPER_GRACE[0]}: {PAPER_GRACE[2]} vs {PAPER_GRACE[1]} (GRACE, another model)",
                (PAPER_GRACE[2] - PAPER_GRACE[1]) / 100, PAPER_GRACE[1] / 100,
                f"results/ablations/{task}/full vs atomic (the grid)"))
    # 3. the ablations (Table 4): Δ = ablated − full, on each task of the grid
    for t in params.ablations.tasks:
        claims += _ablation_claims(ev, t)
    # 4. throughput (a measured ratio, not a paired comparison)
    tp = _measured(res / "throughput" / "metrics.json")
    if tp:
        flat = tp.get("flatness_ratio")
        cross = tp.get("crossover_n_candidates")
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
        ours = (f"CART decode q/s, largest gallery / smallest ({tp.get('n_candidates_largest')} / "
                f"{tp.get('n_candidates_smallest')}, batch {tp.get('ratio_batch_size')}): {fmt(flat)}; constrained / "
                f"unconstrained: {fmt(tp.get('constraint_overhead_ratio'))}; crossover with exact dual-tower search at "
                f"{cross if cross is not None else 'no size measured'} candidates")
        verdict = "not measured" if flat is None else "holds" if flat >= 0.9 else "refuted"
        claims.append(_other_claim("Throughput stays flat as candidates grow (decode q/s ratio ≥ 0.9)", "—", ours,
                                   "Figure 4: flat on CPU and GPU, dual-tower falls, widest gap at 1M candidates and "
                                   "batch 100 (values not given); Table 5: CART 105.8 queries/s on Flickr30K", verdict,
                                   "results/throughput/throughput.csv, throughput.png"))
    # 5. prefixes group similar items (Figure 5)
    ts = _json(res / "tsne" / params.tsne.task / "metrics.json")
    if ts:
        r, rr = ts["prefix_ratio_first_token"], ts["prefix_ratio_first_token_random"]
        claims.append(_other_claim("Items sharing an identifier prefix sit together (Figure 5; distance ratio below "
                                   "random codes' by 0.05)", params.tsne.task,
                                   f"within/between distance ratio: first token {r:.2f} (random codes {rr:.2f}); "
                                   f"second token inside a cluster {ts['prefix_ratio_second_token_in_cluster']:.2f}",
                                   "qualitative (t-SNE)", "holds" if r < rr - 0.05 else "refuted",
                                   f"results/tsne/{params.tsne.task}/tsne_prefixes.png"))
    return pd.DataFrame(claims, columns=CLAIM_COLUMNS)


def _stage_inputs(lock: dict) -> dict:
    """The deps (path, hash) and params of the READS stages of a parsed dvc.lock."""
    out = {}
    for name, entry in sorted((lock or {}).get("stages", {}).items()):
        if name.split("@")[0] in READS:
            deps = sorted((d["path"], d.get("md5") or d.get("hash") or "") for d in entry.get("deps", []))
            out[name] = {"deps": deps, "params": entry.get("params", {})}
    return out


def _inputs_hash(lock_text: str) -> tuple[str | None, int]:
    import yaml

    try:
        inputs = _stage_inputs(yaml.load(lock_text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    except yaml.YAMLError:
        return None, 0
    if not inputs:
        return None, 0
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), len(inputs)


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=30).stdout
    except Exception:
        return None


def provenance(root: Path, *, max_commits: int = 200) -> Provenance:
    """What produced the results: the hash of the READS stages' inputs in ``dvc.lock`` and the commit
    that recorded those entries (the oldest commit of the newest unbroken run of commits whose
    dvc.lock has the same inputs: later commits that only touched other stages do not count)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return Provenance(None, 0, None, "no dvc.lock (results not produced by `dvc repro`)")
    digest, n = _inputs_hash(lock.read_text())
    if digest is None:
        return Provenance(None, 0, None, "dvc.lock has no entries of the stages the report reads")
    log = _git(root, "log", f"-{max_commits}", "--format=%H", "--", "dvc.lock")
    if log is None:
        return Provenance(digest, n, None, "not a git checkout")
    found = None
    for sha in log.split():
        text = _git(root, "show", f"{sha}:dvc.lock")
        same = text is not None and _inputs_hash(text)[0] == digest
        if same:
            found = sha
        elif found:
            break
    if found:
        return Provenance(digest, n, found, "")
    head = (_git(root, "rev-parse", "HEAD") or "").strip() or "none"
    return Provenance(digest, n, None, f"these dvc.lock entries are not in a commit yet (working tree on top of "
                                       f"`{head}`)")


def _mlflow_runs(root: Path) -> pd.DataFrame:
    """Latest MLflow run id per run name, from the store the stages log to (empty when it is a
    sqlite file this clone does not have)."""
    from cartlib.tracking import sqlite_path, tracking_uri

    db = sqlite_path(tracking_uri(root))
    if db is not None and not db.exists():
        return pd.DataFrame(columns=["run", "run_id"])
    try:
        import logging

        import mlflow

        from cartlib.tracking import EXPERIMENT, tracking_uri

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        mlflow.set_tracking_uri(tracking_uri(root))
        runs = mlflow.search_runs(experiment_names=[EXPERIMENT], order_by=["start_time DESC"])
        if not len(runs):
            return pd.DataFrame(columns=["run", "run_id"])
        runs = runs.drop_duplicates("tags.mlflow.runName")
        return pd.DataFrame({"run": runs["tags.mlflow.runName"], "run_id": runs["run_id"]}).sort_values("run")
    except Exception as e:  # provenance is best effort; the results themselves are on disk
        return pd.DataFrame({"run": [f"(MLflow unavailable: {e.__class__.__name__})"], "run_id": [""]})


def _fmt(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for c in out.columns:
        if out[c].dtype.kind == "f":
            out[c] = out[c].map(lambda v: "" if pd.isna(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:,.0f}")
    return out


def claims_markdown(claims: pd.DataFrame) -> pd.DataFrame:
    """The claims table as shown: Δ, its interval and the relative change formatted; empty where n/a."""
    num = lambda v, f: "" if pd.isna(v) else format(v, f)
    return pd.DataFrame({
        "claim": claims["claim"], "task": claims["task"], "ours": claims["ours"], "test": claims["kind"],
        "Δ": claims["delta"].map(lambda v: num(v, "+.3f")),
        "95% CI": [("" if pd.isna(lo) else f"[{lo:+.3f}, {hi:+.3f}]")
                   for lo, hi in zip(claims["ci_low"], claims["ci_high"])],
        "rel. Δ": claims["rel_delta"].map(lambda v: num(v, "+.1%")),
        "queries; seeds": [f"{q}; {s}" if s else "" for q, s in zip(claims["n_queries"], claims["n_seeds"])],
        "paper": claims["paper"], "paper Δ": claims["paper_delta"].map(lambda v: num(v, "+.3f")),
        "paper rel. Δ": claims["paper_rel_delta"].map(lambda v: num(v, "+.1%")),
        "verdict": claims["verdict"], "evidence": claims["evidence"],
    })


CART_ROW = "**CART** (main run)"


def _interval(row: pd.Series) -> str:
    return "" if pd.isna(row["delta"]) else f"Δ {row['delta']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def evidence_summary(claims: pd.DataFrame, main: pd.DataFrame, *, grid_budget_limited: bool = False) -> str:
    """What the evidence shows, in words generated from the claims and the main table: the verdicts
    counted and listed, and every test where CART loses (a baseline with a higher R@1 than the main
    CART run, a faster baseline), so that a loss is never left for the reader to find."""
    lines = ["## What the evidence shows", ""]
    if len(claims):
        counts = claims["verdict"].value_counts()
        lines += [f"{len(claims)} claims checked: " + ", ".join(
            f"{counts.get(str(v), 0)} {v}" for v in Verdict) + ".", ""]
        for v in Verdict:
            rows = claims[claims["verdict"] == str(v)]
            if len(rows):
                lines.append(f"- **{v}**: " + "; ".join(
                    f"{r['claim']} ({r['task']}{', ' + _interval(r) if _interval(r) else ''})"
                    for _, r in rows.iterrows()) + ".")
        lines.append("")
        if grid_budget_limited and claims["evidence"].astype(str).str.contains("ablations").any():
            lines += ["**The grid's verdicts** (the claims whose evidence is the ablation table or the grid's rows) "
                      "**come from budget-limited models** (see \"Did the models converge?\"): they are the effects "
                      "at the grid's short schedule, not evidence about converged models.", ""]
    losses = []
    for task, rows in (main.groupby("task", sort=False) if len(main) else []):
        cart = rows[rows["system"] == CART_ROW]
        if not len(cart):
            continue
        cart_r1 = cart["recall_at_1"].iloc[0]
        others = rows[rows["system"] != CART_ROW]
        better = others[others["recall_at_1"] > cart_r1]
        if len(better):
            losses.append(f"{task}: R@1 of CART {cart_r1:.3f} is below " + ", ".join(
                f"{s} ({r:.3f})" for s, r in zip(better["system"], better["recall_at_1"])))
        speed = "queries_per_second_with_encoding"
        cart_qps = cart[speed].iloc[0]
        if pd.notna(cart_qps) and others[speed].notna().any():
            slowest = others.loc[others[speed].idxmin()]
            if slowest[speed] > cart_qps:
                losses.append(f"{task}: CART answers {cart_qps:,.0f} queries/s (text in, list out), every baseline "
                              f"more (the slowest, {slowest['system']}: {slowest[speed]:,.0f})")
    lines += ["Where CART loses on this benchmark (point estimates of the main table; the paired intervals of "
              "CART against the dual tower and against dual tower + pseudo-captions are in the claims):", ""]
    lines += [f"- {x}." for x in losses] or ["- nowhere: CART has the best R@1 and is not the slowest on every task."]
    return "\n".join(lines + [""])


def _main_convergence(task: str, m: dict, max_epochs: int, patience: int, curve: list | None = None) -> str:
    best, trained = int(m["best_epoch"]), int(m["epochs_trained"])
    after = trained - best
    state = plateau_state(epochs_trained=trained, best_epoch=best, max_epochs=max_epochs, patience=patience,
                          curve=curve)
    gain = None if curve is None else recent_gain(curve, patience)
    text = {
        Plateau.STILL_IMPROVING: "still improving at its last allowed epoch: **not converged**",
        Plateau.STOPPED_EARLY: f"stopped early after {after} epochs without a better validation R@1: at a plateau",
        Plateau.AT_END: f"no better validation R@1 in the {after} epochs after it: at a plateau",
        Plateau.FLAT: f"its last {patience} epochs raised validation R@1 by {_number(gain):.4f}, at most "
                      f"{FLAT_TOLERANCE}: levelled off, a plateau within that tolerance",
        Plateau.NEAR: f"the schedule ended {after} epoch(s) after it, fewer than the patience ({patience}): near a "
                      "plateau, not a proven one",
    }[state]
    return f"{task}: best epoch {best} of {trained} (at most {max_epochs}; validation R@1 {_number(m['val_recall_at_1']):.3f}), {text}"


class GridConvergence(NamedTuple):
    states: dict  # Plateau → number of the grid's trainings (each model counted once)
    not_plateaued: list  # "row seed s (best epoch b of e)" of each training that did not reach a plateau
    max_epochs: int
    patience: int

    @property
    def n_models(self) -> int:
        return sum(self.states.values())

    @property
    def budget_limited(self) -> int:
        return self.states.get(Plateau.STILL_IMPROVING, 0)


def grid_convergence(root: Path, params: Params) -> GridConvergence:
    """Where each of the grid's trainings ended relative to its validation plateau
    (:func:`cartlib.convergence.plateau_state`, with its validation curve where ``seeds.tsv`` has one),
    each model counted once (the beam rows reuse the full row's models)."""
    max_grid = int(params.grid.train.get("epochs", params.train.epochs))
    patience = int(params.grid.train.get("patience", params.train.patience))
    models = {}
    for task in params.ablations.tasks:
        for row in params.ablations.rows:
            seeds = _table(root / "results" / "ablations" / task / row / "seeds" / "seeds.tsv")
            if seeds is None or not {"model_key", "train_epochs", "best_epoch"} <= set(seeds.columns):
                continue
            curves = seeds.get("val_recall_at_1_per_epoch", pd.Series([None] * len(seeds)))
            for seed, key, e, b, curve in zip(seeds.get("seed", range(len(seeds))), seeds["model_key"],
                                              seeds["train_epochs"], seeds["best_epoch"], curves):
                if pd.notna(e) and pd.notna(b) and (task, key) not in models:
                    state = plateau_state(epochs_trained=int(e), best_epoch=int(b), max_epochs=max_grid,
                                          patience=patience, curve=parse_curve(curve))
                    models[(task, key)] = (state, f"{row} seed {seed} (best epoch {int(b)} of {int(e)})")
    states = {s: sum(st is s for st, _ in models.values()) for s in Plateau}
    not_plateaued = [label for st, label in models.values() if st not in PLATEAUS]
    return GridConvergence({s: n for s, n in states.items() if n}, not_plateaued, max_grid, patience)


def convergence_summary(root: Path, params: Params, grid: GridConvergence | None = None) -> str:
    """Whether the models behind the verdicts converged, from their epochs: a training whose best
    validation epoch is its last allowed one was still improving when its schedule ended, and a
    verdict on it is the effect at that budget, not at convergence. Grid trainings are counted once
    per model (the beam rows reuse the full row's models). ``grid``: :func:`grid_convergence`'s
    result when already computed."""
    lines = ["### Did the models converge?", ""]
    for task in params.base.tasks:
        m = _json(root / "results" / "train" / task / "metrics.json")
        if m and {"best_epoch", "epochs_trained", "val_recall_at_1"} <= set(m):
            h = _table(root / "results" / "train" / task / "history.tsv")
            curve = None if h is None or "val_recall_at_1" not in h or len(h) != int(m["epochs_trained"]) else \
                [float(v) for v in h["val_recall_at_1"]]
            lines.append(f"- Main model, "
                         f"{_main_convergence(task, m, params.train.epochs, params.train.patience, curve)}.")
    g = grid_convergence(root, params) if grid is None else grid
    if g.n_models:
        reached = sum(g.states.get(s, 0) for s in PLATEAUS)
        line = (f"- The grid (at most {g.max_epochs} epochs, patience {g.patience}): {reached} of its {g.n_models} "
                f"trainings reached a plateau ({g.states.get(Plateau.STOPPED_EARLY, 0)} stopped early by the patience, "
                f"{g.states.get(Plateau.AT_END, 0)} with no better validation R@1 in the last {g.patience} epochs of "
                f"the schedule, {g.states.get(Plateau.FLAT, 0)} levelled off: their last {g.patience} epochs raised "
                f"it by at most {FLAT_TOLERANCE})")
        if g.budget_limited:
            line += (f"; {g.budget_limited} had their best validation R@1 at their last allowed epoch, still "
                     f"more than {FLAT_TOLERANCE} better than {g.patience} epochs before: still improving when the "
                     "schedule ended, so **budget-limited, not converged**; their differences are "
                     "the effects at this budget, which need not be the effects at convergence (`make "
                     "reproduce-full` trains the grid at the main scale)")
        if g.states.get(Plateau.NEAR, 0):
            line += (f"; {g.states[Plateau.NEAR]} ended fewer than {g.patience} epochs after their best: near a "
                     "plateau, not a proven one")
        if g.not_plateaued:
            line += ". Not at a proven plateau: " + "; ".join(g.not_plateaued)
        lines.append(line + ".")
    return "\n".join(lines + [""]) if len(lines) > 2 else ""


def learning_curves(root: Path, params: Params):
    """Validation R@1 per epoch of each task's main model (``results/train/<task>/history.tsv``), the
    kept (best) epoch marked: where the plateau is, on validation queries only. None without histories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {t: _table(root / "results" / "train" / t / "history.tsv") for t in params.base.tasks}
    histories = {t: h for t, h in histories.items() if h is not None and "val_recall_at_1" in h}
    if not histories:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for task, h in histories.items():
        line, = ax.plot(h["epoch"], h["val_recall_at_1"], marker="o", label=task)
        best = h.loc[h["val_recall_at_1"].idxmax()]
        ax.plot([best["epoch"]], [best["val_recall_at_1"]], marker="*", markersize=14, color=line.get_color(),
                linestyle="none")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation R@1")
    ax.set_title("Main models: validation R@1 per epoch (★ = the epoch kept)")
    ax.grid(alpha=0.3)
    ax.legend(title="task")
    fig.tight_layout()
    return fig


def grid_caption(params: Params) -> str:
    """What every grid table's rows share: the schedule (``grid.train`` over ``train``), the seeds, the
    queries; stated beside every grid table."""
    over = ", ".join(f"`{k}: {v}`" for k, v in sorted(params.grid.train.items())) or "none (the main scale)"
    t = params.train
    return (f"Every row of the grid trains like the main model (validation R@1 after each epoch on the validation "
            f"queries, early stopping after `patience` epochs without improvement, the best epoch kept) on the grid's "
            f"schedule, the `train` section with these overrides: {over} (main model: `d_model: {t.d_model}`, "
            f"`epochs: {t.epochs}`, `patience: {t.patience}`, "
            f"`max_train_items: {t.max_train_items or 'all'}`), chosen on validation queries "
            f"(`results/tuning/`). So the grid's numbers are comparable with each other, not with the main table. "
            f"Rows {', '.join(f'`{r}`' for r in params.ablations.seeded_rows)} train with seeds "
            f"{list(params.ablations.seeds)}, the others with seed {params.ablations.seeds[0]}; metrics are the mean "
            f"over a row's seeds. Scored on {params.grid.n_queries or 'all'} test queries per task.")


def run(params: Params, root: str | Path) -> ReportResult:
    root = Path(root).resolve()
    ev = Evidence(root, params)
    main = main_table(root, params)
    abl = ablation_table(root, params, ev)
    claims = claims_table(root, params, main, abl, ev)
    shown = claims_markdown(claims)
    tables = root / "results" / "tables"
    io.write_text(tables / "main.md", _fmt(main).to_markdown(index=False) + "\n")
    io.write_text(tables / "main.tex", _fmt(main).to_latex(index=False))
    io.write_text(tables / "ablations.md", _fmt(abl).to_markdown(index=False) + "\n")
    io.write_text(tables / "ablations.tex", _fmt(abl).to_latex(index=False))
    schemes = scheme_table(abl)
    io.write_text(tables / "schemes.md", _fmt(schemes).to_markdown(index=False) + "\n")
    curves = learning_curves(root, params)
    if curves is not None:
        io.save_figure(curves, tables / "learning_curves")
        import matplotlib.pyplot as plt

        plt.close(curves)
    io.write_text(tables / "claims.md", shown.to_markdown(index=False, disable_numparse=True) + "\n")
    prov = provenance(root)
    runs = _mlflow_runs(root)
    caption = grid_caption(params)
    grid = grid_convergence(root, params)
    md = "\n".join([
        "# CART on our benchmark: the paper's claims, checked",
        "",
        "Generated by the `report` stage (`notebooks/09_report.ipynb`) from the results of every other stage; "
        "do not edit by hand. Recall values are fractions (the paper's are %).",
        "",
        "Provenance: " + (
            f"stage inputs sha256 `{prov.inputs_sha256[:16]}…` (the deps and params in `dvc.lock` of the "
            f"{prov.n_stages} stage runs this report reads: {', '.join(READS)})" if prov.inputs_sha256
            else "stage inputs unknown") + ", " + (
            f"recorded in git commit `{prov.commit}`" if prov.commit else prov.note) +
        f"; scale `{params.base.scale.value}`, base seed {params.base.seed}.",
        "",
        evidence_summary(claims, main, grid_budget_limited=grid.budget_limited > 0),
        convergence_summary(root, params, grid),
        "## Claims",
        "",
        f"Each claim about two systems is decided on Δ, the difference of their mean hit@1 (= R@1) over the same "
        f"test queries (for an ablation: row − full; for a ranking: the gap between the row and its nearest "
        f"competitor in the claimed order, oriented so the paper's order is > 0). 95% CI: {stats.METHOD} "
        f"({stats.DEFAULT_RESAMPLES:,} resamples, `cartlib.stats.paired_bootstrap`); with one seed per system "
        "it is the paired percentile bootstrap over queries. `queries; seeds` = the queries compared; the runs "
        "(seeds) of each system. `rel. Δ` = Δ relative to the baseline (the second system, or the full row), "
        "beside the paper's. Verdicts: **holds** when the interval excludes 0 in the paper's direction, "
        "**refuted** when it excludes 0 in the other direction; *adds little* holds only if the whole interval "
        "lies within ±1 pt (and is refuted if it lies wholly outside); a ranking holds only if the gap to each "
        "neighbouring row and the row's own drop exclude 0; anything else is **inconclusive**. Throughput "
        "and the t-SNE claim are measured ratios with a threshold, not paired comparisons.",
        "",
        shown.to_markdown(index=False, disable_numparse=True) if len(claims) else "(no results yet)",
        "",
        "## Main table (the paper's Tables 2–3)",
        "",
        f"`main` = the CART run of the `train`/`evaluate` stages (the main scale, all test queries), beside the "
        "dual tower, FAISS and pseudo-caption matching on the same test queries. Queries/s (this machine, "
        f"2-core CPU) are measured like for like by the `evaluate` stage: every system on the same batches of "
        f"{params.evaluate.batch_size} test queries, the median of {params.evaluate.speed_repeats} passes, "
        "`with_encoding` from the query text to the ranked list (tokenising and MiniLM encoding included), "
        "`without_encoding` from already encoded queries (CART: from the encoder's states; the others: from the "
        "query vectors); CART with the decoder the `throughput` stage times. An empty cell: not applicable. The "
        "other identifier schemes are rows of the grid (below), at the grid's scale.",
        "",
        _fmt(main).to_markdown(index=False),
        "",
        "### Learning curves of the main models",
        "",
        "![Validation R@1 per epoch](tables/learning_curves.png)" if curves is not None else
        "(no training history: run the `train` stage)",
        "",
        "## The grid: ablations (the paper's Table 4 and more) and identifier schemes",
        "",
        caption,
        "",
        f"Tasks {list(params.ablations.tasks)}. A metric cut at k is empty (not applicable) for a row whose lists are "
        "shorter than k (`beam_1`, `beam_5`). `trainable_params` = the decoder's trainable parameters (the encoder is "
        "frozen); `epochs`/`best_epoch` per seed. `delta_*` = row − full (a row that decodes the full row's own models, "
        "e.g. a beam row, against the full row's runs of the same seeds); `delta_r1_ci95_low/high` = the 95% "
        "interval of the paired R@1 difference (the bootstrap above; `n_seeds` runs of the row); "
        "`rel_delta_recall_at_1` = delta / full; `paper_*` = the paper's Flickr30K deltas (fractions) and relative "
        "drop.",
        "",
        _fmt(abl).to_markdown(index=False) if len(abl) else "(no ablation results)",
        "",
        "### Identifier schemes in the same model (the grid's rows, at the grid's scale)",
        "",
        caption,
        "",
        _fmt(schemes).to_markdown(index=False) if len(schemes) else "(no scheme rows)",
        "",
        "## Figures",
        "",
        f"![t-SNE of identifier prefixes](tsne/{params.tsne.task}/tsne_prefixes.png)",
        "",
        "![Throughput against candidates](throughput/throughput.png)",
        "",
        "## MLflow runs of this clone",
        "",
        runs.to_markdown(index=False) if len(runs) else "(no mlflow.db in this clone: the runs were logged "
                                                         "where the pipeline ran)",
        "",
    ])
    io.write_text(root / "results" / "REPORT.md", md)
    return ReportResult(main, abl, claims, md)
