# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `compare`: the same generative model on another identifier scheme
#
# One row of the main table: the CART model (same encoder, decoder, fusion, losses) trained on the identifiers of scheme `variant` (atomic / GRACE-style, hierarchical K-Means / DSI-style, RQ-VAE only / TIGER-style, or CART's own), on the cheaper `compare:` schedule of `params.yaml`, and scored on the same subset of test queries as every other row of that schedule.

# %% tags=["parameters"]
task = "image"  # image | audio | video (injected by cart-stage; "" for whole-suite stages)
variant = ""  # identifier scheme (compare) or ablation row (ablations), injected
root = "."  # repository root (injected)

# %%
from IPython.display import display
import pandas as pd
from cartlib.config import load_params
from cartlib.results import split_metrics, split_table  # shown: results, not this run's timings
from cartlib.paths import task_paths

params = load_params(f"{root}/params.yaml")
paths = task_paths(root, task)
print(f"task={task}  scale={params.base.scale.value}  seed={params.base.seed}")

# %%
from cartlib.stages import variant as variant_stage

result = variant_stage.run_compare(params, paths, variant)
pd.Series(split_metrics(result.metrics).metrics, name=f'{task} / {variant}').to_frame()

# %% [markdown]
# ## Training curve

# %%
split_table(result.history)[0]
