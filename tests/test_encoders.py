import numpy as np
import pytest
import torch

from cartlib.encoders import contrastive, media, text


@pytest.mark.parametrize("task, shape, dtype", [
    ("image", (64, 64, 3), np.uint8),
    ("audio", (16000,), np.float16),
    ("video", (8, 32, 32, 3), np.uint8),
])
def test_towers_give_unit_vectors(task, shape, dtype):
    tower = media.build_tower(task, out_dim=16, width=8, n_mels=32, media_shape=shape).eval()
    rng = np.random.default_rng(0)
    x = (rng.random((3, *shape)) * (255 if dtype == np.uint8 else 1)).astype(dtype)
    out = tower(torch.from_numpy(x))
    assert out.shape == (3, 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_contrastive_loss_falls_and_aligns():
    rng = np.random.default_rng(0)
    n = 16
    torch.manual_seed(0)
    # each item a distinct checkerboard of two colours: learnable, unlike pure noise
    cols = rng.integers(0, 256, (n, 2, 3))
    board = (np.add.outer(np.arange(64) // 8, np.arange(64) // 8) % 2)[None, :, :, None]
    imgs = np.where(board == 0, cols[:, None, None, 0], cols[:, None, None, 1]).astype(np.uint8)
    txt = rng.normal(size=(n, 2, 16)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    tower = media.build_tower("image", out_dim=16, width=8, n_mels=8, media_shape=(64, 64, 3))
    res = contrastive.train_tower(tower, media=imgs, text=txt, epochs=20, batch_size=16, lr=3e-3,
                                  weight_decay=0.0, temperature=0.1, seed=0)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0]
    emb = contrastive.embed_media(res.model, imgs)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # training pairs are retrieved: the item's own captions are its nearest text
    assert ((emb @ txt[:, 0].T).argmax(1) == np.arange(n)).mean() > 0.5


def test_mel_filterbank_partitions_frequencies():
    fb = media.mel_filterbank(n_mels=20, n_fft=512, sample_rate=16000)
    assert fb.shape == (257, 20)
    peaks = fb.argmax(0)
    assert (np.diff(peaks.numpy()) > 0).all()  # centres increase
    assert torch.all(fb <= 1.0 + 1e-6)


def test_text_encoder_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    tok, model = text.load_text_encoder()
    sents = ["a small red circle in the upper left", "a loud high beep followed by a click train", "x"]
    ours = text.encode_sentences(sents, tokenizer=tok, model=model, batch_size=2)
    ref = st.SentenceTransformer(text.bundled_model_path(), device="cpu").encode(sents, normalize_embeddings=True)
    assert np.allclose(ours, ref, atol=1e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_empty_query_is_rejected():
    tok, model = text.load_text_encoder()
    with pytest.raises(ValueError, match="empty text at position 1"):
        text.encode_sentences(["fine", "  "], tokenizer=tok, model=model)
