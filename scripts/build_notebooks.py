"""Write the stage notebooks from the compact cell lists below (run after editing this file).

Notebooks are thin: a `parameters` cell (what papermill injects: where, never hyperparameters),
calls into cartlib, and displays. They are committed without outputs.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
PARAMS = 'task = "image"  # image | audio | video (injected by cart-stage)\nroot = "."  # repository root (injected)'
SETUP = """from IPython.display import display
import pandas as pd
from cartlib.config import load_params
from cartlib.paths import task_paths

params = load_params(f"{root}/params.yaml")
paths = task_paths(root, task)
print(f"task={task}  scale={params.base.scale.value}  seed={params.base.seed}")"""

PARAMS_V = ('task = "image"  # image | audio | video (injected by cart-stage; "" for whole-suite stages)\n'
            'variant = ""  # identifier scheme (compare) or ablation row (ablations), injected\n'
            'root = "."  # repository root (injected)')
SETUP_SUITE = """from IPython.display import Markdown, display
import pandas as pd
from cartlib.config import load_params

params = load_params(f"{root}/params.yaml")
print(f"scale={params.base.scale.value}  seed={params.base.seed}")"""

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01_data.ipynb": [
        ("md", "# Stage `data`: the built-in cross-modal benchmark\n\nRenders one task's media (images, "
               "audio clips or videos) from the seed, with human-style reference captions (the queries) and "
               "pseudo-captions from a deliberately imperfect captioner (for caption enhancement). "
               "Writes `data/<task>/dataset/` and `data/<task>/qrels.tsv`; sizes come from `params.yaml` (`data:`)."),
        ("params", PARAMS),
        ("code", SETUP),
        ("code", "from cartlib.stages import data as data_stage\n\nresult = data_stage.run(params, paths)\n"
                 "pd.Series(result.metrics, name=task).to_frame()"),
        ("md", "## Sample items\nEach with its first reference caption and first pseudo-caption. "
               "The pseudo-caption may drop or confuse attributes on purpose."),
        ("code", "result.figure"),
        ("md", "## Captions of the first test item"),
        ("code", "first = result.dataset.split_items('test')['item_id'].iloc[0]\n"
                 "result.dataset.captions[result.dataset.captions['item_id'] == first]"),
    ],
    "02_features.ipynb": [
    ("md", "# Stage `features`: item and query features, and the dual-tower baseline\n\n"
           "Query side: the bundled pretrained all-MiniLM-L6-v2, frozen (mean-pooled, unit norm). "
           "Item side: a small media tower (CNN) trained with the symmetric InfoNCE loss on the train split "
           "into that frozen text space, so all three modalities share one space (as ImageBind gives the paper). "
           "The same model, scored on the test gallery, is the **dual-tower baseline**."),
    ("params", PARAMS),
    ("code", SETUP),
    ("code", "from cartlib.stages import features as features_stage\n\nresult = features_stage.run(params, paths)"),
    ("md", "## Training curve"),
    ("code", "result.figure"),
    ("md", "## Dual-tower baseline on the test gallery"),
    ("code", "pd.Series(result.metrics, name=f'dual-tower ({task})').to_frame()"),
    ("md", "## The first ranked lists (`run.tsv`)"),
    ("code", "result.run.head(12)"),
    ],
    "03_identifiers.ipynb": [
        ("md", "# Stage `identifiers`: coarse → fine → unique\n\n"
               "CART's identifier is `(k, v_1..v_M, u)`: `k` the K-Means cluster of the item's feature, "
               "`v_1..v_M` a residual RQ-VAE's codes of `x − centroid_k`, `u` a counter that makes colliding "
               "identifiers unique. The competing schemes (atomic / GRACE, hierarchical K-Means / DSI, "
               "RQ-VAE only / TIGER, K-Means + unique token, random codes) are built by the same code, and "
               "each one's health is measured: code usage and perplexity per level, collisions, the unique "
               "token's tail. RQ-VAE codebook collapse would show as low usage and perplexity."),
        ("params", PARAMS),
        ("code", SETUP),
        ("code", "from cartlib.stages import identifiers as identifiers_stage\n\n"
                 "result = identifiers_stage.run(params, paths)"),
        ("md", "## Health of every scheme"),
        ("code", "result.health.set_index('scheme').T"),
        ("md", "## Codebook usage per level"),
        ("code", "result.figures['code_usage']"),
        ("md", "## Cluster and prefix sizes of the default scheme"),
        ("code", "result.figures['cluster_sizes']"),
        ("md", "## The first identifiers (level-local codes; the last column is `u`)"),
        ("code", "pd.DataFrame(result.codes[params.identifiers.scheme][:8])"),
    ],
    "04_train.ipynb": [
        ("md", "# Stage `train`: the CART model\n\n"
               "A query encoder (the bundled MiniLM; all S = 6 layers' hidden states are kept) and a compact "
               "autoregressive decoder that emits the identifier `(k, v_1..v_M, u)` level by level. Each decoder "
               "layer reads the encoder through the **two-branch coarse-to-fine fusion** (coarse: all layers "
               "concatenated and projected, cross-attention, sigmoid gate; fine: one cross-attention per layer "
               "mixed by learnable weights α). Training pairs: train-split queries → their item's identifier, "
               "plus (**caption enhancement**) every gallery item's pseudo-captions → its identifier. Loss: "
               "cross-entropy + ω · symmetric KL between two dropout passes (R-Drop consistency). Test queries "
               "are never seen in training."),
        ("params", PARAMS),
        ("code", SETUP),
        ("code", "from cartlib.stages import train as train_stage\n\nresult = train_stage.run(params, paths)"),
        ("md", "## Training curve"),
        ("code", "result.figure"),
        ("code", "result.history"),
        ("md", "## Summary"),
        ("code", "pd.Series(result.metrics, name=task).to_frame()"),
    ],
    "05_evaluate.ipynb": [
        ("md", "# Stage `evaluate`: constrained beam search on the test gallery\n\n"
               "Every test query is answered by generating identifiers with a beam search constrained by the "
               "prefix index of the test gallery's identifiers (so only valid identifiers come out); the ranked "
               "list is the beams in score order. Recall@1/5/10 and MRR@10 against `qrels.tsv`, next to the "
               "dual-tower baseline of the `features` stage, whichever way it falls."),
        ("params", PARAMS),
        ("code", SETUP),
        ("code", "from cartlib.stages import evaluate as evaluate_stage\n\n"
                 "result = evaluate_stage.run(params, paths)\nresult.comparison"),
        ("md", "## All metrics"),
        ("code", "pd.Series(result.metrics, name=task).to_frame()"),
        ("md", "## Error analysis\nFor queries whose top-1 identifier is wrong: the level of the first wrong token "
               "(a wrong coarse token `k` means the query went to the wrong cluster)."),
        ("code", "result.errors"),
        ("md", "## The first ranked lists (`run.tsv`)"),
        ("code", "result.run.head(12)"),
    ],
    "05b_baselines.ipynb": [
        ("md", "# Stage `baselines`: the non-generative rows of the main table\n\n"
               "On the `features` stage's vectors: exact dual-tower search (torch) and FAISS flat / IVF / HNSW, "
               "each with recall against the qrels and against exact search, and its own queries/s on this machine. "
               "Then the **honest counterpart of caption enhancement**: CART is trained on every gallery item's "
               "pseudo-captions, so we also match the test queries against those pseudo-captions with the bundled "
               "MiniLM (no training), alone and fused with the dual-tower score."),
        ("params", PARAMS_V),
        ("code", SETUP),
        ("code", "from cartlib.stages import baselines as baselines_stage\n\n"
                 "result = baselines_stage.run(params, paths)\nresult.table"),
    ],
    "05c_compare.ipynb": [
        ("md", "# Stage `compare`: the same generative model on another identifier scheme\n\n"
               "One row of the main table: the CART model (same encoder, decoder, fusion, losses) trained on the "
               "identifiers of scheme `variant` (atomic / GRACE-style, hierarchical K-Means / DSI-style, RQ-VAE "
               "only / TIGER-style, or CART's own), on the cheaper `compare:` schedule of `params.yaml`, and scored "
               "on the same subset of test queries as every other row of that schedule."),
        ("params", PARAMS_V),
        ("code", SETUP),
        ("code", "from cartlib.stages import variant as variant_stage\n\n"
                 "result = variant_stage.run_compare(params, paths, variant)\n"
                 "pd.Series(result.metrics, name=f'{task} / {variant}').to_frame()"),
        ("md", "## Training curve"),
        ("code", "result.history"),
    ],
    "06_ablations.ipynb": [
        ("md", "# Stage `ablations`: one row of the ablation grid\n\n"
               "Row `variant` of `params.yaml` `ablations.rows`: overrides of the `identifiers`, `train` or "
               "`evaluate` sections, trained on the cheaper `compare:` schedule on the `ablations.task` task. "
               "`dvc exp run -S` of one row's key reruns that row only; the `report` stage gathers the rows into "
               "`results/tables/ablations.md` with the paper's Flickr30K deltas beside ours."),
        ("params", PARAMS_V),
        ("code", SETUP_SUITE),
        ("code", "from cartlib.stages import variant as variant_stage\n\n"
                 "print('overrides:', params.ablations.rows[variant])\n"
                 "result = variant_stage.run_ablation(params, root, variant)\n"
                 "pd.Series(result.metrics, name=variant).to_frame()"),
        ("md", "## Training curve (empty when the model came from the cache of an identical earlier row)"),
        ("code", "result.history"),
    ],
    "07_tsne.ipynb": [
        ("md", "# Stage `tsne`: do items that share an identifier prefix sit together? (Figure 5 analogue)\n\n"
               "t-SNE of test-gallery item features coloured by the first identifier token, then by the second "
               "token inside one coarse cluster, and the same for random codes. The number under each panel is "
               "computed in the feature space: mean cosine distance within a prefix over mean distance between "
               "prefixes (< 1: the prefix groups similar items)."),
        ("params", PARAMS_V),
        ("code", SETUP),
        ("code", "from cartlib.stages import tsne as tsne_stage\n\nresult = tsne_stage.run(params, paths)\n"
                 "result.figure"),
        ("code", "pd.Series(result.metrics, name=task).to_frame()"),
    ],
    "09_report.ipynb": [
        ("md", "# Stage `report`: the paper's claims, checked on our benchmark\n\n"
               "Gathers every stage's results into the main table (`results/tables/main.md`/`.tex`), the ablation "
               "table (`results/tables/ablations.md`/`.tex`) and `results/REPORT.md`: each claim of the paper with "
               "our evidence, a verdict (holds / does not hold / mixed), the paper's number beside ours, and "
               "provenance (git commit, params hash, MLflow run ids). Whichever way the evidence falls."),
        ("params", PARAMS_V),
        ("code", SETUP_SUITE),
        ("code", "from cartlib import report\n\nresult = report.run(params, root)\ndisplay(Markdown(result.markdown))"),
    ],
}



def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src in cells:
        if kind == "md":
            nb.cells.append(new_markdown_cell(src))
        else:
            cell = new_code_cell(src)
            if kind == "params":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids keep diffs quiet
        cell["id"] = f"{Path(name).stem}-{i:02d}"
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), ROOT / "notebooks" / name)
        print("wrote", ROOT / "notebooks" / name)


if __name__ == "__main__":
    main()
