# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `report`: the paper's claims, checked on our benchmark
#
# Gathers every stage's results into the main table (`results/tables/main.md`/`.tex`), the ablation table (`results/tables/ablations.md`/`.tex`) and `results/REPORT.md`: each claim of the paper with our evidence — the paired difference over the test queries (per-query `run.tsv` of every system, one per seed), its 95% two-level bootstrap interval (seeds, then queries; `cartlib.stats`), the number of seeds — a verdict (holds / refuted / inconclusive), the paper's number beside ours, absolute and relative, and provenance (the hash of the stage inputs in `dvc.lock` and the commit that recorded them, MLflow run ids). Whichever way the evidence falls.

# %% tags=["parameters"]
task = "image"  # image | audio | video (injected by cart-stage; "" for whole-suite stages)
variant = ""  # unused here (ablation stages only), injected
root = "."  # repository root (injected)

# %%
from IPython.display import Markdown, display
import pandas as pd
from cartlib.config import load_params

params = load_params(f"{root}/params.yaml")
print(f"scale={params.base.scale.value}  seed={params.base.seed}")

# %%
from cartlib import report

result = report.run(params, root)
display(Markdown(result.markdown))

# %%
# the claims with their intervals, as numbers
result.claims[["claim", "task", "kind", "delta", "ci_low", "ci_high", "rel_delta", "n_seeds", "paper_delta",
               "paper_rel_delta", "verdict"]]
