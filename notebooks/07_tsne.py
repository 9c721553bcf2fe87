# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `tsne`: do items that share an identifier prefix sit together? (Figure 5 analogue)
#
# t-SNE of test-gallery item features coloured by the first identifier token, then by the second token inside one coarse cluster, and the same for random codes. The number under each panel is computed in the feature space: mean cosine distance within a prefix over mean distance between prefixes (< 1: the prefix groups similar items).

# %% tags=["parameters"]
task = "image"  # image | audio | video (injected by cart-stage; "" for whole-suite stages)
variant = ""  # unused here (ablation stages only), injected
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
from cartlib.stages import tsne as tsne_stage

result = tsne_stage.run(params, paths)
result.figure

# %%
pd.Series(split_metrics(result.metrics).metrics, name=task).to_frame()
