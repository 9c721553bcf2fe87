# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `ablations`: one row of the ablation grid
#
# Row `variant` of `params.yaml` `ablations.rows` on task `task`: the grid's schedule (`grid.train`, shared by every row, the `full` row included), then the row's overrides of the `identifiers`, `train` or `evaluate` sections. It trains like the main model (validation R@1 after each epoch, early stopping after `train.patience` epochs, the best epoch kept), once per seed of `ablations.seeds` for the paper's rows, and is scored on the test queries of `grid.n_queries` (0 = all). `dvc exp run -S` of one row's key reruns that row only; the `report` stage gathers the rows into `results/tables/ablations.md` with the paper's Flickr30K deltas beside ours.

# %% tags=["parameters"]
task = "image"  # image | audio | video (injected by cart-stage; "" for whole-suite stages)
variant = ""  # the ablation row (injected)
root = "."  # repository root (injected)

# %%
from IPython.display import Markdown, display
import pandas as pd
from cartlib.config import load_params
from cartlib.results import split_metrics, split_table  # shown: results, not this run's timings

params = load_params(f"{root}/params.yaml")
print(f"scale={params.base.scale.value}  seed={params.base.seed}")

# %%
from cartlib.stages import variant as variant_stage

print('overrides:', params.ablations.rows[variant])
result = variant_stage.run_ablation(params, root, variant, task=task)
pd.Series(split_metrics(result.metrics).metrics, name=variant).to_frame()

# %% [markdown]
# ## Training curve (empty when the model came from the cache of an identical earlier row)

# %%
split_table(result.history)[0]
