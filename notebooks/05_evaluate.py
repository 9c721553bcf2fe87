# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `evaluate`: constrained beam search on the test gallery
#
# Every test query is answered by generating identifiers with a beam search constrained by the prefix index of the test gallery's identifiers (so only valid identifiers come out); the ranked list is the beams in score order. Recall@1/5/10 and MRR@10 against `qrels.tsv`, next to the dual-tower baseline of the `features` stage, whichever way it falls.

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
from cartlib.stages import evaluate as evaluate_stage

result = evaluate_stage.run(params, paths)
result.comparison

# %% [markdown]
# ## Queries/s of every main-table system, like for like
# CART, the dual tower (exact, FAISS flat / IVF / HNSW) and dual tower + pseudo-caption matching run on the same batches: the test queries sorted by length, in batches of `evaluate.batch_size` (the batches CART was just ranked in), each timed over `evaluate.speed_repeats` passes (median) after a warm-up batch. **With encoding**: a batch's texts to its ranked list (tokenise, encode, search). **Without encoding**: the search alone, from the encoded batch (CART: beam search from the encoder states; the dual tower: from the query vectors). The measured rates change with every run, so they are not shown here: they are in `results/evaluate/<task>/speed.timings.tsv` (columns `queries_per_second_with_encoding`, `queries_per_second_without_encoding`); this notebook shows what was timed.

# %%
from cartlib.bench.main_speed import caption as speed_caption
from cartlib.results import split_table

print(speed_caption(result.speed))
split_table(result.speed)[0]

# %% [markdown]
# ## All metrics

# %%
pd.Series(split_metrics(result.metrics).metrics, name=task).to_frame()

# %% [markdown]
# ## Error analysis
# For queries whose top-1 identifier is wrong: the level of the first wrong token (a wrong coarse token `k` means the query went to the wrong cluster).

# %%
result.errors

# %% [markdown]
# ## The first ranked lists (`run.tsv`)

# %%
result.run.head(12)
