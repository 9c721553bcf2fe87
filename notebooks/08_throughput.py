# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `throughput`: queries/s as the gallery grows (Figure 4)
#
# CART's Figure 4 claims that generative retrieval keeps its throughput as the number of candidates grows (its cost is set by the identifier length and the beam, not by N), while dual-tower search (CLIP/CLAP) slows down; the gap is widest at 1M candidates and 100 concurrent queries. This stage measures it on this machine, for galleries of `throughput.sizes` candidates and batches of `throughput.batch_sizes` queries.
#
# **Galleries.** N candidates are sampled from a distribution fitted to the task's real item features: per K-Means cluster of the CART identifier model, a Gaussian with the cluster's mean, its top principal directions and a per-dimension residual spread, then L2-normalised. Their identifiers come from the task's *real* CART identifier model (K-Means + RQ-VAE, refit with the `identifiers` stage's config and seed, which reproduces its table), so coarse-token frequencies, prefix fan-out, collisions and the size of the unique-token level grow with N as on real data. The within-cluster covariance keeps the features' low intrinsic dimension: a diagonal Gaussian would scatter each cluster over all dimensions and make the approximate-search baselines look worse than they are.

# %% [markdown]
# ## The systems, and why each comparison is fair
#
# | system | what is timed | fair because |
# |---|---|---|
# | `cart_end_to_end` | MiniLM encoding of pre-tokenised queries + constrained beam search | the whole query path of CART (tokenising, ~0.1 ms/query, is left out so CPU and GPU rows compare) |
# | `cart_decode` | constrained beam search from precomputed encoder states (encoder-side keys/values included) | starts where `dual_tower_exact` starts: both systems share the same MiniLM query encoder, so this is the like-for-like pair, and the crossover is drawn between them |
# | `unconstrained_decode` | the same search without the prefix constraint | the floor of decoding: `cart_decode / unconstrained_decode` is the cost of the constraint |
# | `dual_tower_exact` | exact inner-product top-k by torch matmul over the N×D features | same device, threads and dtype as CART (fp32 CPU, fp16 GPU), score blocks bounded in memory; the reference of `recall_vs_exact` |
# | `faiss_flat` | FAISS `IndexFlatIP` | exact; `recall_vs_exact` must be 1.0 |
# | `faiss_ivf` | FAISS `IndexIVFFlat`, nlist ≈ 4√N | nprobe is the smallest power of two reaching recall@10 ≥ 0.95 against exact search, as a practitioner would tune it |
# | `faiss_hnsw` | FAISS `IndexHNSWFlat`, M = `baselines.hnsw_m` | efSearch tuned to the same recall target; built only up to `throughput.hnsw_max_candidates` (slow to build on 2 cores) |
#
# FAISS runs with torch's thread count. Each number is the median of `throughput.repeats` timed batches after a warm-up, the device synchronised around every call; systems that share a model or index run in interleaved rounds. A combination whose warm-up batch exceeds `throughput.max_batch_seconds` (or is predicted to, from a smaller gallery) is skipped and listed below. Index build times are not in queries/s; they are in the gallery table.

# %% tags=["parameters"]
task = ""  # not used: params.yaml throughput.task chooses the task (injected by cart-stage)
variant = ""  # not used (injected)
root = "."  # repository root (injected)

# %%
from IPython.display import display
import pandas as pd
from cartlib.stages import throughput
from cartlib.config import load_params

params = load_params(f"{root}/params.yaml")
cfg = params.throughput
print(f"task={cfg.task}  scale={params.base.scale.value}  sizes={list(cfg.sizes)}  batches={list(cfg.batch_sizes)}  "
      f"beam={cfg.beam}  repeats={cfg.repeats}")

# %%
result = throughput.run(params, root)

# %% [markdown]
# ## Queries/s (rows: system and batch size; columns: candidates)

# %%
result.table.pivot_table(index=['system', 'batch_size'], columns='n_candidates', values='qps').round(1)

# %% [markdown]
# ## Figure 4 analogue
# Log–log; batch 100 (or the closest) drawn solid, the other batch sizes thin; the star marks where CART decoding overtakes exact dual-tower search, if it does. The last panel is the GPU: with `results/throughput/throughput_gpu.csv` present (the CSV of `scripts/gpu_check.py`, run on a GPU machine), queries/s of CART constrained and unconstrained decoding (fp16) and of exact fp16 dual-tower search at batch 1,024; without it, the panel says so.

# %%
result.figure

# %% [markdown]
# ## Targets
# Measured with a clock, so they are in `results/throughput/timings.json` (`metrics.json` keeps what a rerun does not change: the decoder's FLOPs per query, the gallery sizes).
# - `constraint_overhead_ratio`: `cart_decode` / `unconstrained_decode` queries/s at the largest gallery (batch 100 or the closest): the price of the prefix constraint;
# - `flatness_ratio`: `cart_decode` queries/s at the largest gallery / at the smallest: 1 = flat;
# - `crossover_n_candidates`: where `cart_decode` overtakes `dual_tower_exact` (null if it does not in the measured range);
# - `arithmetic_floor_fraction`: the decoder's FLOPs per query (counted from its config) at the measured large-matmul rate of this device, divided by the measured time per query: the share of the device's matmul rate the decoder reaches.

# %%
pd.Series({**result.metrics, **result.timings}, name='throughput').to_frame()

# %% [markdown]
# ## Galleries
# Level sizes of the identifiers (the unique-token level grows with N), where the decoder weights come from (the trained model where its level sizes match, else random weights of its config: throughput does not depend on the weights), build times, and the tuned FAISS settings with their recall.

# %%
result.galleries.set_index('n_candidates').T

# %% [markdown]
# ## Skipped combinations

# %%
result.skipped

# %% [markdown]
# ## The GPU check (`results/throughput/throughput_gpu.csv`, merged into `gpu_rows.csv`)
# Rows of `scripts/gpu_check.py` from a GPU machine: queries/s of every decoding system by gallery size and batch (`input`: from encoded queries or text in), then training texts/s, fp16-vs-fp32 agreement, the host-sync check and the targets with pass/fail. The query encoder there has MiniLM's shape with random weights (speed depends on shapes, not weights). Absent until someone runs the script on a GPU.

# %%
gpu = throughput.gpu_tables(result.gpu)
display(*gpu) if isinstance(gpu, tuple) else print(gpu)

# %% [markdown]
# ## All rows (`results/throughput/throughput.csv`)

# %%
print(result.caption)
result.table
