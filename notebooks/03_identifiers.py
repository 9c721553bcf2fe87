# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `identifiers`: coarse → fine → unique
#
# CART's identifier is `(k, v_1..v_M, u)`: `k` the K-Means cluster of the item's feature, `v_1..v_M` a residual RQ-VAE's codes of `x − centroid_k`, `u` a counter that makes colliding identifiers unique. The competing schemes (atomic / GRACE, hierarchical K-Means / DSI, RQ-VAE only / TIGER, K-Means + unique token, random codes) are built by the same code, and each one's health is measured: code usage and perplexity per level, collisions, the unique token's tail. RQ-VAE codebook collapse would show as low usage and perplexity.

# %% tags=["parameters"]
task = "image"  # image | audio | video (injected by cart-stage)
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
from cartlib.stages import identifiers as identifiers_stage

result = identifiers_stage.run(params, paths)

# %% [markdown]
# ## Health of every scheme

# %%
split_table(result.health)[0].set_index('scheme').T

# %% [markdown]
# ## Codebook usage per level

# %%
result.figures['code_usage']

# %% [markdown]
# ## Cluster and prefix sizes of the default scheme

# %%
result.figures['cluster_sizes']

# %% [markdown]
# ## The first identifiers (level-local codes; the last column is `u`)

# %%
pd.DataFrame(result.codes[params.identifiers.scheme][:8])
