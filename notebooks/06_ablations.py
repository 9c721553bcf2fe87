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
# Row `variant` of `params.yaml` `ablations.rows`: overrides of the `identifiers`, `train` or `evaluate` sections, trained on the cheaper `compare:` schedule on the `ablations.task` task. `dvc exp run -S` of one row's key reruns that row only; the `report` stage gathers the rows into `results/tables/ablations.md` with the paper's Flickr30K deltas beside ours.

# %% tags=["parameters"]
task = "image"  # image | audio | video (injected by cart-stage; "" for whole-suite stages)
variant = ""  # identifier scheme (compare) or ablation row (ablations), injected
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
result = variant_stage.run_ablation(params, root, variant)
pd.Series(split_metrics(result.metrics).metrics, name=variant).to_frame()

# %% [markdown]
# ## Training curve (empty when the model came from the cache of an identical earlier row)

# %%
split_table(result.history)[0]
