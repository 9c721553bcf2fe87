"""Real-dataset loaders on tiny fixtures in each dataset's exact format, and CLIP/CLAP-style feature
extraction on tiny random-weight models built from configs (no download, no network)."""
import csv
import json
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cartlib.data import real
from cartlib.data.features import load_features
from cartlib.data.schema import DataFormatError, load_dataset, load_qrels



def _av():
    return pytest.importorskip("av")  # PyAV: only the video tests need it


def _pil():
    return pytest.importorskip("PIL.Image")


# ----------------------------------------------------------------------------- media writers

def write_image(path: Path, value: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = np.clip(rng.normal(value, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
    _pil().fromarray(arr).save(path, format=fmt)


def write_wav(path: Path, freq: float, *, rate: int = 8000, seconds: float = 0.5, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    x = np.repeat(x[:, None], channels, 1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())


def write_video(path: Path, values, *, size=(32, 24)) -> None:
    """One constant-grey frame per value (mpeg4 keeps flat frames nearly exact)."""
    av = _av()
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for v in values:
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), v, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_csv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# ----------------------------------------------------------------------------- dataset fixtures

def make_flickr30k(root: Path) -> Path:
    specs = [("1000092795.jpg", "test"), ("10002456.jpg", "test"), ("1000268201.jpg", "train"),
             ("1000344755.jpg", "train"), ("1000366164.jpg", "val")]
    images = []
    for k, (name, split) in enumerate(specs):
        write_image(root / "images" / name, 40 * k + 20)
        sents = [{"raw": f"A dog number {k} runs, caption {j}.", "tokens": ["a", "dog"], "imgid": k,
                  "sentid": 5 * k + j} for j in range(5)]
        images.append({"sentids": [s["sentid"] for s in sents], "imgid": k, "sentences": sents, "split": split,
                       "filename": name})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def make_coco(root: Path) -> Path:
    specs = [("val2014", 42, "test"), ("val2014", 73, "test"), ("train2014", 9, "train"), ("val2014", 133, "restval")]
    images = []
    for k, (sub, cocoid, split) in enumerate(specs):
        name = f"COCO_{sub}_{cocoid:012d}.jpg"
        write_image(root / sub / name, 50 * k + 10)
        sents = [{"raw": f"a cat on sofa {k} number {j}", "tokens": []} for j in range(5 + (k % 2))]  # COCO: 5–7
        images.append({"filepath": sub, "filename": name, "cocoid": cocoid, "split": split, "sentences": sents})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


AUDIOCAPS_HEADER = ["audiocap_id", "youtube_id", "start_time", "caption"]


def make_audiocaps(root: Path) -> Path:
    train = [("91139", "r1nicOVtvkQ", "130", "A woman talks nearby as water pours"),
             ("58146", "UDGBjjwyaqE", "20", "Multiple clanging and clanking sounds"),
             ("11542", "-9GzV-Ge0Nc", "30", "Birds chirping in the distance")]
    test = [(str(100 + j), yt, "30", f"{what} caption {j}") for yt, what in (("--0w1YA1Hm4", "engine idling"),
                                                                              ("-AheI8Epim4", "a man speaks"))
            for j in range(5)]
    val = [("900", "val_clip_01", "0", "a dog barks")]
    for split, rows in (("train", train), ("test", test), ("val", val)):
        write_csv(root / f"{split}.csv", AUDIOCAPS_HEADER, rows)
        for i, (_, yt, start, _) in enumerate(rows):
            write_wav(root / "audio" / split / f"{yt}_{start}.wav", 200 + 100 * i)
    return root


def make_clotho(root: Path) -> Path:
    header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
    for split, names in (("development", ["Santa Motor.wav", "Radio Garble.wav", "Footsteps, gravel.wav"]),
                         ("validation", ["Rain on roof.wav"]), ("evaluation", ["Ambience Birds.wav", "Bus stop.wav"])):
        rows = [[n] + [f"sound of {Path(n).stem.lower()}, take {j}" for j in range(5)] for n in names]
        write_csv(root / f"clotho_captions_{split}.csv", header, rows)
        for i, n in enumerate(names):
            write_wav(root / split / n, 300 + 50 * i, rate=11025)
    return root


def make_msrvtt(root: Path) -> Path:
    vids = ["video0", "video1", "video2", "video6600", "video7010", "video7020"]
    own = ["train", "train", "train", "validate", "test", "test"]
    videos = [{"video_id": v, "split": s, "category": i, "id": i} for i, (v, s) in enumerate(zip(vids, own))]
    sentences = [{"video_id": v, "caption": f"clip {v} shows thing {j}", "sen_id": 20 * i + j}
                 for i, v in enumerate(vids) for j in range(3)]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    write_csv(root / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"],
              [["ret0", "msr7010", "video7010", "a girl is putting a sweater on a dog"],
               ["ret1", "msr7020", "video7020", "a man drives a red car"]])
    for i, v in enumerate(vids):
        write_video(root / "videos" / f"{v}.mp4", [20 * i + 10 * k for k in range(6)])
    return root


MSVD_CLIPS = ["-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208", "-8y1Q0rA3n8_108_115", "00jrXRMlZOY_0_10", "0lh_UWF9ZP4_62_69"]


def make_msvd(root: Path, *, lists: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["# Microsoft Research Video Description Corpus", "# one description per line", ""]
    lines += [f"{c} a squirrel number {i} is eating take {j}" for i, c in enumerate(MSVD_CLIPS) for j in range(3)]
    (root / "AllVideoDescriptions.txt").write_text("\n".join(lines) + "\n")
    if lists:
        (root / "train_list.txt").write_text("\n".join(MSVD_CLIPS[:2]) + "\n")
        (root / "val_list.txt").write_text(MSVD_CLIPS[2] + "\n")
        (root / "test_list.txt").write_text("\n".join(MSVD_CLIPS[3:]) + "\n")
    else:  # the standard split by vid number: 1–1200 train, 1201–1300 val, 1301–1970 test
        nums = [1, 2, 1250, 1301, 1970]
        (root / "youtube_mapping.txt").write_text("".join(f"{c} vid{n}\n" for c, n in zip(MSVD_CLIPS, nums)))
    for i, c in enumerate(MSVD_CLIPS):
        write_video(root / "YouTubeClips" / f"{c}.avi", [30 * i + 5 * k for k in range(5)])
    return root


MAKERS = {"flickr30k": make_flickr30k, "coco": make_coco, "audiocaps": make_audiocaps, "clotho": make_clotho,
          "msrvtt": make_msrvtt, "msvd": make_msvd}
# (n_train, n_test, test queries, n_val, validation queries) each fixture must give: the official
# validation split of every dataset becomes split "val"
EXPECTED = {"flickr30k": (2, 2, 10, 1, 5), "coco": (2, 2, 11, 0, 0), "audiocaps": (3, 2, 10, 1, 1),
            "clotho": (3, 2, 10, 1, 5), "msrvtt": (3, 2, 2, 1, 3), "msvd": (2, 2, 6, 1, 3)}


def folder(tmp_path: Path, task: str = "image") -> SimpleNamespace:
    return SimpleNamespace(dataset=tmp_path / "out" / "dataset", qrels=tmp_path / "out" / "qrels.tsv",
                           qrels_val=tmp_path / "out" / "qrels_val.tsv", task=task)


def build(name: str, root: Path, tmp_path: Path, **kw):
    out = folder(tmp_path, real.TASK_OF[name])
    summary = real.build_real_dataset(dataset=name, root=root, task_folder=out, **kw)
    ds = load_dataset(out.dataset)
    return summary, ds, load_qrels(out.qrels, ds)


def build_val_qrels(tmp_path: Path, ds):
    return load_qrels(folder(tmp_path).qrels_val, ds, split="val")


# ----------------------------------------------------------------------------- loaders

@pytest.mark.parametrize("name", list(MAKERS))
def test_loader_writes_the_schema(name, tmp_path):
    root = MAKERS[name](tmp_path / name)
    summary, ds, qrels = build(name, root, tmp_path)
    n_train, n_test, n_queries, n_val, n_val_queries = EXPECTED[name]
    assert (summary.n_train, summary.n_test, summary.n_val, summary.n_items) == \
        (n_train, n_test, n_val, n_train + n_test + n_val)
    assert summary.n_missing == summary.n_unreadable == summary.n_excluded == 0
    assert summary.missing == summary.unreadable == []
    assert ds.manifest["dataset"] == name and ds.manifest["media"] is None and ds.media is None
    assert ds.task == real.TASK_OF[name] and ds.manifest["n_val"] == n_val
    assert list(ds.items["split"]) == ["test"] * n_test + ["train"] * n_train + ["val"] * n_val  # test first
    val_qrels = build_val_qrels(tmp_path, ds)  # a val query's relevant item is its own
    assert len(val_qrels) == n_val_queries == len(ds.queries("val"))
    assert set(val_qrels["item_id"]) == set(ds.split_items("val")["item_id"])
    assert (ds.items["media_index"] == -1).all()
    for rel in ds.items["media_path"]:
        assert not Path(rel).is_absolute() and (root / rel).is_file()
    assert len(qrels) == n_queries == len(ds.queries("test"))
    assert set(qrels["item_id"]) == set(ds.split_items("test")["item_id"])
    assert (ds.captions["kind"] == "reference").all()  # no captioner output given
    assert not ds.items["item_id"].str.contains(r"\s").any()


def test_exact_fields(tmp_path):
    _, ds, qrels = build("msrvtt", make_msrvtt(tmp_path / "m"), tmp_path)
    caps = ds.captions.set_index("caption_id")["text"]
    assert caps["msrvtt-video7010-c0"] == "a girl is putting a sweater on a dog"  # 1K-A: the CSV sentence
    assert list(qrels["query_id"]) == ["msrvtt-video7010-c0", "msrvtt-video7020-c0"]
    assert ds.items.set_index("item_id").loc["msrvtt-video2", "media_path"] == "videos/video2.mp4"
    assert json.loads(ds.items["attributes"].iloc[0]) == {"source_id": "video7010", "source_split": "1k-A test"}


def test_clotho_names_with_spaces_and_commas(tmp_path):
    _, ds, _ = build("clotho", make_clotho(tmp_path / "c"), tmp_path)
    row = ds.items.set_index("item_id").loc["clotho-Footsteps_gravel"]
    assert row["media_path"] == "development/Footsteps, gravel.wav" and row["split"] == "train"


def test_msvd_standard_split_from_mapping(tmp_path):
    summary, ds, _ = build("msvd", make_msvd(tmp_path / "v", lists=False), tmp_path)
    assert (summary.n_train, summary.n_test, summary.n_val, summary.n_excluded) == (2, 2, 1, 0)  # vid1250: val
    assert set(ds.split_items("test")["item_id"]) == {f"msvd-{MSVD_CLIPS[3]}", f"msvd-{MSVD_CLIPS[4]}"}


def test_max_items_pseudo_captions_and_caption_cap(tmp_path):
    root = make_flickr30k(tmp_path / "f")
    lines = [{"media": "images/1000092795.jpg", "captions": ["a dog", "an animal", "a third one"]},
             {"media": "./images/1000268201.jpg", "captions": ["a brown dog"]}]
    (root / real.PSEUDO_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary, ds, _ = build("flickr30k", root, tmp_path, max_items=2, n_pseudo=2, n_captions=3)
    assert (summary.n_test, summary.n_train, summary.n_val, summary.n_excluded) == (1, 1, 0, 3)  # beyond max_items
    caps = ds.captions
    assert (caps["kind"] == "reference").sum() == 6 and summary.n_captions == 6
    assert list(caps[caps["kind"] == "pseudo"]["text"]) == ["a dog", "an animal", "a brown dog"]
    summary0, ds0, _ = build("flickr30k", root, tmp_path)  # n_pseudo=0 by default: the file is ignored
    assert summary0.n_pseudo == 0 and (ds0.captions["kind"] == "reference").all()


# ----------------------------------------------------------------------------- clear errors

def test_wrong_root(tmp_path):
    with pytest.raises(DataFormatError, match="nowhere.*not a directory"):
        real.build_real_dataset(dataset="flickr30k", root=tmp_path / "nowhere", task_folder=folder(tmp_path))
    with pytest.raises(DataFormatError, match="dataset_flickr30k.json.*not found"):
        real.build_real_dataset(dataset="flickr30k", root=tmp_path, task_folder=folder(tmp_path))
    with pytest.raises(ValueError, match="unknown real dataset"):
        real.build_real_dataset(dataset="imagenet", root=tmp_path, task_folder=folder(tmp_path))
    with pytest.raises(ValueError, match="audio dataset but the task is 'image'"):
        real.build_real_dataset(dataset="clotho", root=tmp_path, task_folder=folder(tmp_path, "image"))


@pytest.mark.parametrize("name, remove, pattern", [
    ("audiocaps", "test.csv", r"test.csv: AudioCaps test split file not found"),
    ("clotho", "clotho_captions_evaluation.csv", r"clotho_captions_evaluation.csv: .* not found"),
    ("msrvtt", "MSRVTT_JSFUSION_test.csv", r"MSRVTT_JSFUSION_test.csv: MSR-VTT 1K-A test split file not found"),
    ("msvd", "test_list.txt", r"test_list.txt: MSVD test split list not found"),
    ("msvd", "AllVideoDescriptions.txt", r"AllVideoDescriptions.txt: MSVD caption file not found"),
])
def test_missing_split_or_caption_file(name, remove, pattern, tmp_path):
    root = MAKERS[name](tmp_path / name)
    (root / remove).unlink()
    with pytest.raises(DataFormatError, match=pattern):
        build(name, root, tmp_path)


def test_bad_csv_header_is_named(tmp_path):
    root = make_audiocaps(tmp_path / "a")
    write_csv(root / "test.csv", ["id", "youtube_id", "caption"], [["1", "x", "y"]])
    with pytest.raises(DataFormatError, match=r"test.csv: .*lacks column\(s\) \['audiocap_id', 'start_time'\]"):
        build("audiocaps", root, tmp_path)


@pytest.mark.parametrize("name, victim", [("flickr30k", "images/10002456.jpg"),
                                          ("audiocaps", "audio/test/-AheI8Epim4_30.wav"),
                                          ("msvd", f"YouTubeClips/{MSVD_CLIPS[4]}.avi")])
def test_caption_names_missing_media(name, victim, tmp_path):
    root = MAKERS[name](tmp_path / name)
    (root / victim).unlink()
    with pytest.raises(DataFormatError, match=r"1 of \d+ item\(s\) name a media file that does not exist"):
        build(name, root, tmp_path)
    summary, ds, qrels = build(name, root, tmp_path, on_missing="skip")
    assert summary.n_missing == 1 and summary.missing == [victim]
    assert summary.n_test == EXPECTED[name][1] - 1 and victim not in set(ds.items["media_path"])
    assert set(qrels["item_id"]) <= set(ds.split_items("test")["item_id"])


@pytest.mark.parametrize("name, victim, kind", [("coco", "val2014/COCO_val2014_000000000073.jpg", "an image"),
                                                ("clotho", "evaluation/Bus stop.wav", "a WAV file"),
                                                ("msrvtt", "videos/video1.mp4", "a video")])
def test_unreadable_media(name, victim, kind, tmp_path):
    root = MAKERS[name](tmp_path / name)
    (root / victim).write_bytes(b"this is not media at all" * 10)
    with pytest.raises(real.MediaError, match=f"{victim}: cannot be read as {kind}"):
        build(name, root, tmp_path)
    summary, ds, _ = build(name, root, tmp_path, on_missing="skip")
    assert summary.n_unreadable == 1 and summary.unreadable == [victim] and summary.n_missing == 0
    assert summary.n_items == EXPECTED[name][0] + EXPECTED[name][1] + EXPECTED[name][3] - 1


def test_everything_missing_is_an_error_even_when_skipping(tmp_path):
    root = make_flickr30k(tmp_path / "f")
    for f in (root / "images").iterdir():
        f.unlink()
    with pytest.raises(DataFormatError, match=r"no train item left \(5 missing"):
        build("flickr30k", root, tmp_path, on_missing="skip")
    with pytest.raises(ValueError, match="on_missing='ignore'"):
        build("flickr30k", root, tmp_path, on_missing="ignore")


# ----------------------------------------------------------------------------- media readers

def test_load_audio_resamples_and_mixes_down(tmp_path):
    write_wav(tmp_path / "s.wav", 440, rate=8000, seconds=0.5, channels=2)
    x = real.load_audio(tmp_path / "s.wav", sampling_rate=16000)
    assert x.dtype == np.float32 and x.ndim == 1 and len(x) == 8000
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) * 16000 / len(x) - 440) < 4  # the tone survives resampling
    from scipy.io import wavfile

    wavfile.write(tmp_path / "f.wav", 8000, np.full(800, 0.25, np.float32))  # IEEE float: not for `wave`
    assert np.allclose(real.load_audio(tmp_path / "f.wav"), 0.25)


def test_load_video_frames_samples_uniformly(tmp_path):
    write_video(tmp_path / "v.mp4", [0, 40, 80, 120, 160, 200])
    frames = real.load_video_frames(tmp_path / "v.mp4", n_frames=3)
    assert frames.shape == (3, 24, 32, 3) and frames.dtype == np.uint8
    assert np.allclose(frames.reshape(3, -1).mean(1), [40, 120, 200], atol=6)  # segment centres 1, 3, 5
    more = real.load_video_frames(tmp_path / "v.mp4", n_frames=8)  # more frames than the clip has
    assert more.shape[0] == 8


# ----------------------------------------------------------------------------- precomputed features

def test_import_features_npy_and_parquet(tmp_path):
    root = make_flickr30k(tmp_path / "f")
    build("flickr30k", root, tmp_path)
    out = folder(tmp_path)
    ds = load_dataset(out.dataset)
    refs = ds.captions[ds.captions["kind"] == "reference"]
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    # items keyed by media path (what a user's extractor sees), plus one extra row; npy + tsv
    items = pd.DataFrame({"media_path": list(ds.items["media_path"])[::-1] + ["images/extra.jpg"]})
    items.to_csv(src / "items.tsv", sep="\t", index=False)
    np.save(src / "items.npy", rng.normal(size=(len(items), 6)).astype(np.float32) * 3)
    caps = pd.DataFrame({"caption_id": refs["caption_id"].to_numpy()})
    caps["embedding"] = list(rng.normal(size=(len(caps), 6)))
    caps.to_parquet(src / "captions.parquet")
    got = real.import_features(source=src, dataset_folder=out.dataset, features_folder=tmp_path / "feat")
    assert (got.n_items, got.n_captions, got.dim, got.n_unused) == (5, 25, 6, 1)  # val items included
    feats = load_features(tmp_path / "feat", ds)
    assert np.allclose(np.linalg.norm(feats.items, axis=1), 1) and feats.items.dtype == np.float32
    raw = np.load(src / "items.npy")[::-1][1:]  # rows reversed back, the extra row dropped
    assert np.allclose(feats.items, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    caps.iloc[:-1].to_parquet(src / "captions.parquet")  # one reference caption without a vector
    with pytest.raises(DataFormatError, match=r"captions.parquet: no vector for 1 reference caption"):
        real.import_features(source=src, dataset_folder=out.dataset, features_folder=tmp_path / "feat")


def test_features_dataset_round_trip(tmp_path):
    """data.dataset=features: items/captions tables with vectors build the dataset and its features."""
    root = tmp_path / "bundle"
    root.mkdir()
    items = pd.DataFrame({"item_id": ["a1", "a2", "b1", "b2", "v1"],
                          "split": ["test", "test", "train", "train", "val"]})
    caps = pd.DataFrame({"item_id": ["a1", "a1", "a2", "b1", "b2", "b2", "v1"],
                         "text": ["red ball", "a red ball", "blue cube", "green\tcone", "pink star", "pink star", "x"],
                         "kind": ["reference", "pseudo"] + ["reference"] * 5})
    rng = np.random.default_rng(1)
    items.to_csv(root / "items.tsv", sep="\t", index=False)
    np.save(root / "items.npy", rng.normal(size=(5, 4)))
    caps.to_csv(root / "captions.tsv", sep="\t", index=False)
    np.save(root / "captions.npy", rng.normal(size=(7, 4)))
    out = folder(tmp_path, "image")
    summary = real.build_real_dataset(dataset="features", root=root, task_folder=out, n_pseudo=1)
    assert (summary.n_test, summary.n_train, summary.n_val, summary.n_pseudo, summary.n_excluded) == (2, 2, 1, 1, 0)
    ds = load_dataset(out.dataset)
    assert list(ds.items["item_id"]) == ["a1", "a2", "b1", "b2", "v1"]
    got = real.import_features(source=root, dataset_folder=out.dataset, features_folder=tmp_path / "feat")
    assert got.n_captions == 6  # b2's two identical captions share one vector
    assert load_features(tmp_path / "feat", ds).captions.shape == (6, 4)
    pd.DataFrame({"item_id": ["a 1"], "split": ["test"]}).to_csv(root / "items.tsv", sep="\t", index=False)
    with pytest.raises(DataFormatError, match="items.tsv: item_id 'a 1' is empty or has whitespace"):
        real.build_real_dataset(dataset="features", root=root, task_folder=out)


# ----------------------------------------------------------------------------- pretrained encoders

def _byte_vocab(prefix, suffix_words: bool):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(prefix)}
    for c in chars + ([c + "</w>" for c in chars] if suffix_words else []):
        vocab[c] = len(vocab)
    return vocab


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random-weight CLIPModel + a byte-level CLIPTokenizer (no merges) + the PIL image processor."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    vocab = _byte_vocab([], suffix_words=True)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=48,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(path)
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory) -> Path:
    """A random-weight ClapModel (unfused HTSAT) + byte-level RobertaTokenizer + a 16 kHz feature extractor."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    torch.manual_seed(0)
    vocab = _byte_vocab(["<s>", "<pad>", "</s>", "<unk>"], suffix_words=False)
    vocab["<mask>"] = len(vocab)
    cfg = ClapConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=40),
                     audio_config=dict(depths=[1, 1], num_attention_heads=[1, 2], patch_embeds_hidden_size=8,
                                       hidden_size=16, spec_size=64, num_mel_bins=64, window_size=4),
                     projection_dim=32)  # CLAP projects through a ReLU: too narrow and every unit can be dead
    path = tmp_path_factory.mktemp("clap")
    ClapModel(cfg).save_pretrained(path)
    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=16000, hop_length=320, max_length_s=1,
                              fft_window_size=512, frequency_max=8000, truncation="rand_trunc")
    ClapProcessor(feature_extractor=fe, tokenizer=RobertaTokenizer(vocab=vocab, merges=[])).save_pretrained(path)
    return path


def test_clip_images_and_queries(tiny_clip, tmp_path, monkeypatch):
    import torch

    from cartlib.encoders import pretrained as P

    root = make_flickr30k(tmp_path / "f")
    _, ds, _ = build("flickr30k", root, tmp_path)
    cache = tmp_path / "cache"
    got = P.extract_features(dataset=ds, root=root, kind="clip", model_path=tiny_clip, device="cpu", batch_size=3,
                             cache_dir=cache, progress=False)
    n_refs = int((ds.captions["kind"] == "reference").sum())
    assert got.items.shape == (5, 8) and got.captions.shape == (n_refs, 8) and got.items.dtype == np.float32
    assert np.allclose(np.linalg.norm(got.items, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(got.captions, axis=1), 1, atol=1e-5)
    # the same numbers by hand, through transformers directly
    enc = P.load_pretrained(kind="clip", model_path=tiny_clip)
    with torch.no_grad():
        img = _pil().open(root / ds.items["media_path"].iloc[1]).convert("RGB")
        px = enc.processor(images=[img], return_tensors="pt")["pixel_values"]
        want = torch.nn.functional.normalize(enc.model.get_image_features(pixel_values=px).pooler_output, dim=-1)
        tok = enc.processor.tokenizer([ds.captions["text"].iloc[7]], return_tensors="pt")
        want_t = torch.nn.functional.normalize(enc.model.get_text_features(**tok).pooler_output, dim=-1)
    assert np.allclose(got.items[1], want[0].numpy(), atol=1e-5)
    assert np.allclose(got.captions[7], want_t[0].numpy(), atol=1e-5)  # unsorted back into captions.tsv order
    long = P.encode_texts(["a very long query " * 20, "short"], encoder=enc)  # truncated to the 48 positions
    assert long.shape == (2, 8) and np.isfinite(long).all()
    # resumable: a second run reads every batch from the cache and computes nothing
    assert len(list(cache.rglob("*.npy"))) == 2 + 1  # 2 image batches of 3, 1 text batch of 256
    monkeypatch.setattr(P, "_image_batch", lambda *a, **k: pytest.fail("recomputed a cached image batch"))
    again = P.encode_media([root / p for p in ds.items["media_path"]], encoder=enc, modality="image", batch_size=3,
                           cache_dir=cache)
    assert np.array_equal(again, got.items)


def test_clip_videos_mean_pool_frames(tiny_clip, tmp_path):
    import torch

    from cartlib.encoders import pretrained as P

    root = make_msrvtt(tmp_path / "m")
    _, ds, _ = build("msrvtt", root, tmp_path)
    got = P.extract_features(dataset=ds, root=root, kind="clip", model_path=tiny_clip, device="cpu", batch_size=2,
                             n_frames=3, progress=False)
    assert got.items.shape == (6, 8) and np.allclose(np.linalg.norm(got.items, axis=1), 1, atol=1e-5)
    enc = P.load_pretrained(kind="clip", model_path=tiny_clip)
    frames = real.load_video_frames(root / ds.items["media_path"].iloc[0], n_frames=3)
    with torch.no_grad():
        px = enc.processor(images=list(frames), return_tensors="pt")["pixel_values"]
        per = torch.nn.functional.normalize(enc.model.get_image_features(pixel_values=px).pooler_output, dim=-1)
    want = torch.nn.functional.normalize(per.mean(0), dim=-1).numpy()
    assert np.allclose(got.items[0], want, atol=1e-5)
    batch1 = P.encode_media([root / p for p in ds.items["media_path"]], encoder=enc, modality="video", batch_size=1,
                            n_frames=3)
    assert np.allclose(batch1, got.items, atol=1e-5)  # batching does not change the numbers


def test_clap_audio_and_queries(tiny_clap, tmp_path):
    from cartlib.encoders import pretrained as P

    root = make_audiocaps(tmp_path / "a")
    (root / "audio/train/r1nicOVtvkQ_130.wav").unlink()
    write_wav(root / "audio/train/r1nicOVtvkQ_130.wav", 500, rate=8000, seconds=1.6)  # longer than max_length_s
    _, ds, _ = build("audiocaps", root, tmp_path)
    got = P.extract_features(dataset=ds, root=root, kind="clap", model_path=tiny_clap, device="cpu", batch_size=2,
                             progress=False)
    assert got.items.shape == (6, 32) and got.captions.shape == (14, 32)
    assert np.allclose(np.linalg.norm(got.items, axis=1), 1, atol=1e-5)
    enc = P.load_pretrained(kind="clap", model_path=tiny_clap)
    again = P.encode_media([root / p for p in ds.items["media_path"]], encoder=enc, modality="audio", batch_size=5)
    assert np.allclose(again, got.items, atol=1e-5)  # the long clip's crop is the same in any batch
    assert not np.allclose(got.items[0], got.items[1])  # different sounds, different vectors


def test_pretrained_errors(tiny_clip, tiny_clap, tmp_path):
    from cartlib.encoders import pretrained as P

    with pytest.raises(ValueError, match="not a local model folder"):
        P.load_pretrained(kind="clip", model_path=tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="no config.json"):
        P.load_pretrained(kind="clip", model_path=tmp_path)
    with pytest.raises(ValueError, match="not CLIP-style"):
        P.load_pretrained(kind="clip", model_path=tiny_clap)
    with pytest.raises(ValueError, match="encoder kind 'siglip'"):
        P.load_pretrained(kind="siglip", model_path=tiny_clip)
    enc = P.load_pretrained(kind="clip", model_path=tiny_clip)
    with pytest.raises(ValueError, match="not audio; use clap"):
        P.encode_media([tmp_path / "x.wav"], encoder=enc, modality="audio")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    with pytest.raises(real.MediaError, match="bad.jpg: cannot be read as an image"):
        P.encode_media([bad], encoder=enc, modality="image")
