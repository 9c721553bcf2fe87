# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `features`: item and query features, and the dual-tower baseline
#
# Query side: the bundled pretrained all-MiniLM-L6-v2, frozen (mean-pooled, unit norm). Item side: a small media tower (CNN) trained with the symmetric InfoNCE loss on the train split into that frozen text space, so all three modalities share one space (as ImageBind gives the paper). The same model, scored on the test gallery, is the **dual-tower baseline**.

# %% tags=["parameters"]
task = "image"  # image | audio | video (injected by cart-stage)
root = "."  # repository root (injected)

# %%
from IPython.display import display
import pandas as pd
from cartlib.config import load_params
from cartlib.results import split_metrics  # shown: results, not this run's timings
from cartlib.paths import task_paths

params = load_params(f"{root}/params.yaml")
paths = task_paths(root, task)
print(f"task={task}  scale={params.base.scale.value}  seed={params.base.seed}")

# %%
from cartlib.stages import features as features_stage

result = features_stage.run(params, paths)

# %% [markdown]
# ## Training curve

# %%
result.figure

# %% [markdown]
# ## Dual-tower baseline on the test gallery

# %%
pd.Series(split_metrics(result.metrics).metrics, name=f'dual-tower ({task})').to_frame()

# %% [markdown]
# ## The first ranked lists (`run.tsv`)

# %%
result.run.head(12)
