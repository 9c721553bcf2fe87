"""Caption quality against the references: corpus BLEU-4 (sacrebleu) and, on the built-in benchmark,
attribute accuracy/recall (`cartlib.captions.attributes`)."""
from __future__ import annotations

from typing import Sequence

from cartlib.captions import attributes as A


def bleu_4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (4-grams, its 13a tokeniser, lower-cased: the captioner writes lower case),
    in [0, 100]; `references[i]` are all the reference captions of hypothesis i (any number ≥ 1)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists")
    if not hypotheses:
        return float("nan")
    width = max(map(len, references))
    if min(map(len, references)) < 1:
        raise ValueError("every hypothesis needs at least one reference caption")
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams, lowercase=True).score)


def caption_quality(captions: Sequence[Sequence[str]], references: Sequence[Sequence[str]], *,
                    attributes: Sequence[dict] | None, task: str, prefix: str = "") -> dict:
    """{prefix}bleu_4 (first caption of each item vs its references), and with `attributes` (built-in
    benchmark) {prefix}attribute_accuracy / _recall over all of each item's captions."""
    out = {f"{prefix}bleu_4": round(bleu_4([c[0] for c in captions], references), 4)}
    if attributes is not None:
        s = A.attribute_scores(captions, attributes, task=task)
        out.update({f"{prefix}attribute_accuracy": round(s.accuracy, 4), f"{prefix}attribute_recall": round(s.recall, 4),
                    f"{prefix}mentions_per_caption": round(s.n_mentions / max(s.n_captions, 1), 3)})
    return out
