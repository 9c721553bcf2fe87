# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `train`: the CART model
#
# A query encoder (the bundled MiniLM; all S = 6 layers' hidden states are kept) and a compact autoregressive decoder that emits the identifier `(k, v_1..v_M, u)` level by level. Each decoder layer reads the encoder through the **two-branch coarse-to-fine fusion** (coarse: all layers concatenated and projected, cross-attention, sigmoid gate; fine: one cross-attention per layer mixed by learnable weights α). Training pairs: train-split queries → their item's identifier, plus (**caption enhancement**) every gallery item's pseudo-captions → its identifier. Loss: cross-entropy + ω · symmetric KL between two dropout passes (R-Drop consistency). Test queries are never seen in training.

# %% tags=["parameters"]
task = "image"  # image | audio | video (injected by cart-stage)
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
from cartlib.stages import train as train_stage

result = train_stage.run(params, paths)

# %% [markdown]
# ## Training curve

# %%
result.figure

# %%
split_table(result.history)[0]

# %% [markdown]
# ## Summary

# %%
pd.Series(split_metrics(result.metrics).metrics, name=task).to_frame()
