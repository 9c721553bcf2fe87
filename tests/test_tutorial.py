"""The teaching notebook `00_tutorial` and its helpers (`cartlib/tutorial.py`).

Unit tests check the helpers against independent oracles (the former library decoder kept in
`tests/reference_decoder.py`, plain Python sets for the tree and the prefix constraint); the
integration test executes the notebook with papermill at a
tiny scale and checks that every step drew its figure.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nbformat
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from cartlib import tutorial, viz
from cartlib.ids.prefix import PrefixIndex
from cartlib.model.cart import CartModel, EncoderStates
from reference_decoder import reference_beam_search

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "00_tutorial.ipynb"
SMALL = {"n_items": 40, "n_threads": 1, "tower_epochs": 1, "n_clusters": 8, "rqvae_epochs": 4, "epochs": 1,
         "d_model": 32, "n_layers": 1, "beam": 5}
N_FIGURES = 9  # one per step of the method (sections 1-9)


def _tiny_model(level_sizes: tuple[int, ...]) -> CartModel:
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32))
    model = CartModel(text_encoder=enc, freeze_encoder=True, level_sizes=level_sizes, d_model=16, n_layers=2,
                      n_heads=2, fusion=True)
    with torch.no_grad():
        model.head.weight.mul_(8.0)  # peaked distributions: few near-ties
    return model.eval()


def _table(n: int, sizes: tuple[int, ...], seed: int) -> torch.Tensor:
    rows = list(itertools.product(*(range(k) for k in sizes)))
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.tensor([rows[i] for i in pick.tolist()])


@pytest.mark.parametrize("beam", [1, 4, 40])
def test_beam_trace_ends_where_constrained_beam_search_does(beam):
    sizes = (3, 4, 3, 2)
    codes = _table(30, sizes, seed=1)
    index = PrefixIndex.build(codes, sizes)
    model = _tiny_model(sizes)
    g = torch.Generator().manual_seed(0)
    states = EncoderStates(torch.randn(2, 3, 5, 16, generator=g), torch.ones(3, 5, dtype=torch.bool))
    top_k = min(beam, 30)
    ref = reference_beam_search(model, states, index, beam=beam, top_k=top_k)  # the batched oracle
    for q in range(3):
        trace = tutorial.trace_beam_search(model, encoded=states.select(torch.tensor([q])), prefix_index=index,
                                           beam=beam, top_k=top_k)
        np.testing.assert_array_equal(trace.items, ref.items[q].numpy())
        np.testing.assert_array_equal(trace.codes, ref.codes[q].numpy())
        np.testing.assert_allclose(trace.scores, ref.scores[q].numpy(), rtol=1e-5, atol=1e-5)
        assert len(trace.levels) == len(sizes)
        for t in trace.levels:  # every kept beam is a valid extension with the score the model gave it
            ok = np.isfinite(t.scores)
            assert t.allowed[t.parents[ok], t.codes[ok]].all()
            np.testing.assert_allclose(t.scores[ok], (t.prefix_scores[t.parents] + t.log_probs[t.parents, t.codes])[ok],
                                       rtol=1e-5, atol=1e-5)
        frame = tutorial.trace_frame(trace, top=1000)
        removed = frame[frame.status == "removed by prefix constraint"]
        assert not any(trace.levels[r.level].allowed[r.beam, r.code] for r in removed.itertuples())
        assert (frame.groupby("level").status.apply(lambda s: (s == "kept").sum()).to_numpy()
                == [int(np.isfinite(t.scores).sum()) for t in trace.levels]).all()
        valid = {tuple(r) for r in codes.tolist()}  # oracle of the constraint: Python prefix sets
        for r in removed.itertuples():
            assert r.prefix + (r.code,) not in {p[:len(r.prefix) + 1] for p in valid}
        summary = tutorial.trace_summary(trace)
        assert summary["beams_in"].tolist() == [len(t.prefix_scores) for t in trace.levels]


def test_tree_layout_matches_the_prefix_sets():
    codes = np.array([[0, 1, 0], [0, 1, 1], [0, 2, 0], [1, 0, 0], [2, 0, 0], [0, 0, 0], [1, 0, 1]])
    lay = viz.tree_layout(codes, clusters=[0, 1])
    rows = [i for i in range(len(codes)) if codes[i, 0] in (0, 1)]
    assert lay.leaves == sorted(rows, key=lambda i: tuple(codes[i]))  # lexicographic, top to bottom
    for depth in range(codes.shape[1] + 1):  # oracle: the distinct prefixes of each length
        expected = {tuple(int(c) for c in codes[i, :depth]) for i in rows}
        assert {p for p in lay.nodes if len(p) == depth} == expected
    for prefix, (x, y) in lay.nodes.items():  # an inner node sits within the span of its leaves
        ys = [j for j, i in enumerate(lay.leaves) if tuple(codes[i, :len(prefix)]) == prefix]
        assert x == len(prefix) and min(ys) <= y <= max(ys)
    assert set(lay.edges) == {(p[:-1], p) for p in lay.nodes if p}
    with pytest.raises(ValueError, match="no item"):
        viz.tree_layout(codes, clusters=[7])


def test_training_pairs_never_hold_a_test_query():
    data = tutorial.make_data(task="image", n_items=6, seed=0)
    test = set(zip(data.test_rows.tolist(), data.test_texts))
    assert len(test) == 6 * data.n_test_captions
    for enhance, n_pseudo in ((True, 2), (False, 0)):
        pairs = tutorial.training_pairs(data, caption_enhancement=enhance)
        assert len(pairs.texts) == 6 * (5 - data.n_test_captions + n_pseudo)
        assert not test & set(zip(pairs.rows.tolist(), pairs.texts))
        assert (pairs.kinds == "pseudo").sum() == 6 * n_pseudo


@pytest.mark.slow
def test_tutorial_notebook_runs_at_a_tiny_scale(tmp_path):
    import papermill as pm

    out = tmp_path / "00_tutorial.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out), parameters=SMALL, kernel_name="python3", cwd=str(tmp_path),
                        progress_bar=False, execution_timeout=600)
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= N_FIGURES
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "40 items, 80 test queries" in text and "whole notebook:" in text
    tables = [o["data"]["text/plain"] for o in outputs if "text/plain" in o.get("data", {})]
    assert any("CART" in t and "dual tower" in t and "recall_at_1" in t for t in tables)
