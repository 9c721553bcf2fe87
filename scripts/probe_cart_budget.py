"""Budget probe: CART on the default image task with a reduced training budget (not a pipeline stage).

Needs the default `dvc repro` outputs (data, features, identifiers of the image task). Trains CART
(frozen MiniLM, two-branch fusion, decoder 2 × width 256, ω = 1, caption enhancement) on all
pseudo-captions plus one in five train reference captions (17,000 texts) for 3 epochs, then runs
the evaluate stage's constrained beam search on the 5,000 test queries and prints CART next to
the dual-tower baseline. Writes models/image/probe_cart.pt; publishes nothing.
Run: `.venv/bin/python scripts/probe_cart_budget.py` (about 27 min on the 2-core CPU).
"""
import dataclasses, time, numpy as np, pandas as pd, torch
from cartlib.config import load_params
from cartlib.paths import task_paths
from cartlib.data import schema
from cartlib.data.idstore import load_identifiers
from cartlib.stages.train import training_pairs, build_model, save_bundle
from cartlib.stages import evaluate
from cartlib.train import train_cart
params = load_params("params.yaml"); paths = task_paths(".", "image")
cfg = dataclasses.replace(params.train, d_model=256, n_heads=4, epochs=3, consistency_weight=1.0, n_val_items=0)
ds = schema.load_dataset(paths.dataset, verify_hashes=False)
table = load_identifiers(paths.data / "identifiers", "cart", item_ids=ds.items["item_id"].to_numpy())
pairs = training_pairs(ds, caption_enhancement=True, n_val_items=0, seed=0)
rng = np.random.default_rng(0)
keep = np.flatnonzero(pairs.kinds == "pseudo").tolist()
ref = np.flatnonzero(pairs.kinds == "reference"); keep += rng.choice(ref, size=len(ref) // 5, replace=False).tolist()  # 1 of 5 refs
keep = np.array(sorted(keep)); print("texts", len(keep), flush=True)
torch.manual_seed(0); tok, model = build_model(cfg, table.vocab.level_sizes)
t = time.time()
res = train_cart(model, tokenizer=tok, texts=[pairs.texts[i] for i in keep], codes=torch.from_numpy(table.codes)[pairs.rows[keep]],
                 epochs=cfg.epochs, batch_size=cfg.batch_size, lr=1e-3, weight_decay=cfg.weight_decay, warmup_ratio=0.05,
                 grad_clip=1.0, consistency_weight=cfg.consistency_weight, seed=0, max_length=48, checkpoint_dir=None, progress=False)
print("train s", time.time() - t, [round(h["loss"], 3) for h in res.history], flush=True)
save_bundle("models/image/probe_cart.pt", model=res.model, cfg=cfg, table=table, history=res.history)
evaluate.publish = lambda *a, **k: None
t = time.time(); r = evaluate.run(params, paths, progress=False, model_name="probe_cart.pt")
print("eval s", time.time() - t); print(r.comparison.to_string()); print(r.errors.to_string()); print(r.metrics)
