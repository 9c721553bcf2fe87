# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # CART in one sitting: generative cross-modal retrieval on 300 items
#
# CART (Fang et al., ACL 2025) answers a text query by *generating the identifier* of the right item instead of scoring every item. This notebook runs the whole method on a tiny gallery of rendered images, in a few minutes on a laptop CPU, and draws a picture at every step:
#
# 1. items, captions and pseudo-captions
# 2. item features and the coarse token `k` (K-Means)
# 3. the residuals `x − centroid_k`
# 4. the fine tokens `v_1..v_M` (residual RQ-VAE)
# 5. the identifier tree `(k, v_1..v_M, u)`
# 6. training a small CART model (frozen MiniLM, coarse-to-fine fusion, caption enhancement, consistency loss)
# 7. one constrained beam search, step by step
# 8. the learned fusion weights α
# 9. recall against a dual-tower baseline
#
# All logic lives in `cartlib` (the helpers of this notebook in `cartlib/tutorial.py`); the method is summarised in `CART.md`. Exercises are at the end of the sections, marked **Try**.

# %% tags=["parameters"]
task = "image"            # image, audio or video
n_items = 300             # the gallery: every item gets an identifier
seed = 0
n_threads = 2             # torch threads; 0 keeps the torch default
tower_epochs = 20         # media tower: the item features and the dual-tower baseline
n_clusters = 16           # K: the coarse K-Means token k
n_levels = 2              # M: RQ-VAE levels v1..vM on the residual
codebook_size = 8         # codes per RQ-VAE level
rqvae_epochs = 40
epochs = 10               # CART training epochs
d_model = 128             # decoder width
n_layers = 2              # decoder layers
fusion = True             # two-branch coarse-to-fine fusion; False: the w/o-fusion ablation
caption_enhancement = True  # pseudo-captions as extra training queries
consistency_weight = 1.0  # omega of the R-Drop consistency loss; 0 turns it off
beam = 10

# %%
import time

import numpy as np
import pandas as pd
import torch
from IPython.display import display

from cartlib import tutorial
from cartlib.encoders.text import load_text_encoder
from cartlib.ids.kmeans import KMeansQuantizer
from cartlib.ids.prefix import PrefixIndex
from cartlib.ids.schemes import build_identifier_model
from cartlib.model.cart import CartModel
from cartlib.train import train_cart
from cartlib import viz

started, started_cpu = time.perf_counter(), time.process_time()
tutorial.setup_notebook(n_threads=n_threads, seed=seed)
tokenizer, text_encoder = load_text_encoder()  # the bundled all-MiniLM-L6-v2, offline
print(f'torch threads: {torch.get_num_threads()}, text encoder: '
      f'{text_encoder.config.num_hidden_layers} layers x {text_encoder.config.hidden_size}')

# %% [markdown]
# ## 1. Items, captions and pseudo-captions
#
# The built-in benchmark renders small scenes (shapes with a colour, size and position on a background) from a seed. Every item has 5 human-style **reference captions** (synonyms, word order, optional attributes) and 2 **pseudo-captions** from a deliberately imperfect "captioner" that drops or confuses attributes: the stand-in for the captioning model of CART's *caption enhancement*. Here the last 2 reference captions of every item are the test queries; the others, and the pseudo-captions, are for training.

# %%
data = tutorial.make_data(task=task, n_items=n_items, seed=seed)
print(f'{len(data.item_ids)} items, {len(data.test_texts)} test queries')
viz.plot_items(data, n=4)

# %%
tutorial.caption_table(data, rows=[0])

# %% [markdown]
# ## 2. Item features and the coarse token `k`
#
# The paper uses ImageBind features for every candidate. Here a small CNN (the *media tower*) is trained with the symmetric InfoNCE loss to map each image into the frozen MiniLM text space, using the training captions. The same two towers, scored by cosine similarity, are the **dual-tower baseline** of section 9.
#
# The identifier starts with the coarse token `k`: the K-Means cluster of the item's feature.

# %%
features = tutorial.item_features(data, tokenizer=tokenizer, text_model=text_encoder,
                                  epochs=tower_epochs, seed=seed)
kmeans = KMeansQuantizer(n_clusters=n_clusters, seed=seed).fit(features.items)
print(f'item features {features.items.shape}; tower InfoNCE loss '
      f'{features.history.loss.iloc[0]:.2f} -> {features.history.loss.iloc[-1]:.2f}')
viz.plot_clusters(features.items, labels=kmeans.labels_, centers=kmeans.cluster_centers_)

# %% [markdown]
# **Try:** change `n_clusters` (K) in the parameters cell, e.g. 4 or 48, and rerun. Fewer clusters make `k` easy to predict but leave more for the fine tokens; more clusters do the opposite.

# %% [markdown]
# ## 3. Residuals: what the coarse token leaves
#
# CART quantises the **residual** `x − centroid_k`, not the feature: the coarse token already says *where* an item lives, the fine tokens only have to say where *within* its cluster. On the same axes, every cluster moves to the origin and the vectors get much shorter.

# %%
residual = kmeans.residual(features.items)
print(f'mean norm: features {np.linalg.norm(features.items, axis=1).mean():.3f}, '
      f'residuals {np.linalg.norm(residual, axis=1).mean():.3f}')
viz.plot_residuals(features.items, labels=kmeans.labels_, centers=kmeans.cluster_centers_)

# %% [markdown]
# ## 4. The fine tokens: a residual RQ-VAE
#
# An MLP encoder maps the residual to a latent; `M` codebooks quantise it one after another, each one what the previous levels left; an MLP decoder reconstructs. Loss = reconstruction + β·commitment. `build_identifier_model('cart', ...)` does K-Means, the residual RQ-VAE and the unique token `u` in one `fit` (with the same seed it finds the same clusters as above). Healthy codebooks use all their codes (no *collapse*), and every level lowers the error.

# %%
identifier = build_identifier_model(
    'cart', n_clusters=n_clusters, n_levels=n_levels, codebook_size=codebook_size,
    latent_dim=16, hidden_dim=64, epochs=rqvae_epochs, batch_size=64, seed=seed,
).fit(features.items)
codes = identifier.codes_  # (N, L): k, v1..vM, u
print(f'same k as section 2 for {(identifier.labels_ == kmeans.labels_).mean():.0%} of the items')
pd.Series(identifier.health()).round(3).to_frame('health').T

# %%
viz.plot_rqvae_levels(identifier, features.items)

# %% [markdown]
# **Try:** set `n_levels = 1` or `codebook_size = 32`, and watch code usage and the collision counter `u` in the health table.

# %% [markdown]
# ## 5. The identifier tree
#
# Every item's identifier is `(k, v_1, …, v_M, u)`; `u` counts items whose other tokens collide, so every identifier is unique. Together they form a prefix tree: items that share a prefix share a path from the root. Below, the tree of two clusters, each leaf labelled with its item's plain description. `PrefixIndex` stores this tree as flat tensors for decoding.

# %%
index = PrefixIndex.build(torch.from_numpy(codes), identifier.level_sizes_)
print(index)
tutorial.identifier_frame(codes, labels=data.descriptions, rows=range(6))

# %%
tree_clusters = np.unique(codes[:, 0])[:2]
viz.plot_identifier_tree(codes, clusters=tree_clusters, labels=data.descriptions)

# %% [markdown]
# ## 6. Training a small CART model
#
# Encoder: the pretrained MiniLM, frozen; all of its S = 6 layers are kept. Decoder: a compact transformer that emits the identifier level by level. Each decoder layer reads the encoder through the **two-branch coarse-to-fine fusion**: a *coarse* branch attends to all layers concatenated and projected (with a sigmoid self-gate), a *fine* branch attends to each layer separately and mixes them with learned weights α. Training queries: the training reference captions plus (**caption enhancement**) the pseudo-captions. Loss: cross-entropy on the identifier tokens + ω · symmetric KL between two dropout passes (**R-Drop consistency**).

# %%
pairs = tutorial.training_pairs(data, caption_enhancement=caption_enhancement)
torch.manual_seed(seed)
model = CartModel(text_encoder=text_encoder, freeze_encoder=True, level_sizes=identifier.level_sizes_,
                  d_model=d_model, n_layers=n_layers, n_heads=4, dropout=0.1, fusion=fusion)
print(f'{len(pairs.texts)} training queries ({(pairs.kinds == "pseudo").sum()} pseudo-captions); '
      f'{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters')
result = train_cart(model, tokenizer=tokenizer, texts=pairs.texts, codes=torch.from_numpy(codes[pairs.rows]),
                    epochs=epochs, batch_size=64, lr=2e-3, warmup_ratio=0.05,
                    consistency_weight=consistency_weight, seed=seed, max_length=48, progress=False)
model = result.model.eval()
viz.plot_training(result.history)

# %% [markdown]
# **Try:** set `fusion = False` (plain cross-attention to the last encoder layer, the paper's "w/o fusion") or `caption_enhancement = False` or `consistency_weight = 0.0`, retrain, and compare the recall table of section 9.

# %% [markdown]
# ## 7. One beam search, step by step
#
# Retrieval = generating identifiers. At every level the decoder scores the next code of each beam; the prefix index removes codes that no gallery identifier continues with (**red**: the model liked them, but they lead nowhere); the best `beam` candidates survive (**green**); the rest fall off the beam (**grey**). The final beams, in score order, are the ranked list. `tutorial.trace_beam_search` runs the suite's one decoder, `cartlib.decode.constrained_beam_search`, with a hook that keeps what every level saw.

# %%
query, gold = data.test_texts[0], int(data.test_rows[0])
encoded = tutorial.encode_queries(model, tokenizer, [query])
trace = tutorial.trace_beam_search(model, encoded=encoded, prefix_index=index, beam=beam, top_k=beam)
print(f'query: {query!r}\nright item: {data.descriptions[gold]!r}, identifier {tuple(codes[gold].tolist())}')
viz.plot_beam_trace(tutorial.trace_frame(trace, top=10), tutorial.trace_summary(trace), names=viz.level_names(n_levels))

# %%
tutorial.final_beams(trace, labels=data.descriptions, gold=gold)

# %% [markdown]
# The candidates the prefix constraint removed, level by level:

# %%
steps = tutorial.trace_frame(trace, top=2 * beam)
steps[steps.status == 'removed by prefix constraint']

# %% [markdown]
# ## 8. The learned fusion weights α
#
# The fine branch mixes one cross-attention per encoder layer with weights α (one per layer and feature dimension, softmax over the layers, uniform 1/S at the start). Where α moves away from 1/S, the decoder has learned which encoder layers to lean on (in BERT-like encoders the lower layers keep more of the words themselves, the higher ones more of the sentence meaning). After a short training α moves only a little.

# %%
viz.plot_fusion_alpha(tutorial.fusion_alpha(model), fusion_mode=model.fusion_mode.value)

# %% [markdown]
# ## 9. Recall against the dual-tower baseline
#
# The held-out reference captions against all items: CART's constrained beam search vs the dual-tower baseline (cosine similarity of the MiniLM query vector and the media tower's item vector) trained on the same captions. At this toy scale either can win; the paper's claim is about large galleries, where CART's cost does not grow with the number of items.

# %%
cart = tutorial.cart_rankings(model, tokenizer, data.test_texts, prefix_index=index, beam=beam)
table = tutorial.recall_table({'CART': cart.items, 'dual tower': tutorial.dual_tower_rankings(features)},
                              gold=data.test_rows)
display(table.round(3))
viz.plot_recall(table, n_candidates=len(data.item_ids))

# %%
print(f'whole notebook: {time.perf_counter() - started:.0f} s wall, '
      f'{time.process_time() - started_cpu:.0f} s CPU, at {torch.get_num_threads()} torch threads')

# %% [markdown]
# ## Exercises
#
# 1. **Fusion off.** Set `fusion = False` and rerun everything: how does recall change, and what does section 8 show now?
# 2. **Change K.** Try `n_clusters = 4` and `n_clusters = 48`. Look at the cluster sizes, the tree, and where the beam search goes wrong (section 7: at which level does the right item fall off?).
# 3. **No caption enhancement.** Set `caption_enhancement = False`: fewer training queries.
# 4. **No consistency loss.** Set `consistency_weight = 0.0`: faster, and the KL curve is gone.
# 5. **Beam width.** Set `beam = 1` (greedy) or `beam = 30`; R@1 vs R@10.
# 6. **Another modality.** Set `task = 'audio'` or `task = 'video'`.
#
# For the full benchmark (thousands of items, every ablation, throughput) see the stage notebooks `01`–`05` and `README.md`.
