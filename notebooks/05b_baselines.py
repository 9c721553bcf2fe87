# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `baselines`: the non-generative rows of the main table
#
# On the `features` stage's vectors: exact dual-tower search (torch) and FAISS flat / IVF / HNSW, each with recall against the qrels and against exact search, and its own queries/s on this machine. Then the **honest counterpart of caption enhancement**: CART is trained on every gallery item's pseudo-captions, so we also match the test queries against those pseudo-captions with the bundled MiniLM (no training), alone and fused with the dual-tower score.

# %% tags=["parameters"]
task = "image"  # image | audio | video (injected by cart-stage; "" for whole-suite stages)
variant = ""  # unused here (ablation stages only), injected
root = "."  # repository root (injected)

# %%
from IPython.display import display
import pandas as pd
from cartlib.config import load_params
from cartlib.results import split_table  # shown: results, not this run's timings
from cartlib.paths import task_paths

params = load_params(f"{root}/params.yaml")
paths = task_paths(root, task)
print(f"task={task}  scale={params.base.scale.value}  seed={params.base.seed}")

# %%
from cartlib.stages import baselines as baselines_stage

result = baselines_stage.run(params, paths)
split_table(result.table)[0]
