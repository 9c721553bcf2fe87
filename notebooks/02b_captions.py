# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `captions`: every item's pseudo-captions, from a learned captioner
#
# CART's caption enhancement trains on pseudo-captions of every gallery item. Here they come from a small captioning model trained on the **train split's reference captions only**: a ClipCap-style prefix (Mokady et al. 2021) maps the item vector of the `features` stage into a small causal transformer that writes the caption. The captioner sees the media only through the dual tower's media-side vectors, so **its errors are tied to the dual tower's**. Its quality is measured on validation items (BLEU-4 against their references; on the built-in benchmark, how many of the attributes it states are true of the item, and how many of the item's attributes it states) next to the obvious baseline: the captions of the nearest train item in the same feature space. `captions.captioner: rules` copies the built-in benchmark's rule-based captions instead (teaching, ablation); a real dataset's own `pseudo_captions.jsonl` overrides both.

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
print(f"task={task}  scale={params.base.scale.value}  seed={params.base.seed}  captioner={params.captions.captioner}")

# %%
from cartlib.stages import captions as captions_stage

result = captions_stage.run(params, paths)
print(f"source: {result.source}; {len(result.pseudo)} pseudo-captions")

# %% [markdown]
# ## Quality (validation items; `baseline_*` = the nearest train item's captions)

# %%
pd.Series(split_metrics(result.metrics).metrics, name=f"captions ({task})").to_frame()

# %% [markdown]
# ## What the numbers mean

# %%
for note in result.notes:
    print("-", note)

# %% [markdown]
# ## Training curve of the captioner

# %%
result.history.drop(columns=["seconds"], errors="ignore")

# %% [markdown]
# ## A few items: a reference, the pseudo-captions, the baseline's

# %%
result.figure

# %%
result.pseudo.head(12)
