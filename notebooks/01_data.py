# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `data`: the built-in cross-modal benchmark
#
# Renders one task's media (images, audio clips or videos) from the seed, with human-style reference captions (the queries) and pseudo-captions from a deliberately imperfect captioner (for caption enhancement). Writes `data/<task>/dataset/` and `data/<task>/qrels.tsv`; sizes come from `params.yaml` (`data:`).

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
from cartlib.stages import data as data_stage

result = data_stage.run(params, paths)
pd.Series(split_metrics(result.metrics).metrics, name=task).to_frame()

# %% [markdown]
# ## Sample items
# Each with its first reference caption and first pseudo-caption. The pseudo-caption may drop or confuse attributes on purpose.

# %%
result.figure

# %% [markdown]
# ## Captions of the first test item

# %%
first = result.dataset.split_items('test')['item_id'].iloc[0]
result.dataset.captions[result.dataset.captions['item_id'] == first]
