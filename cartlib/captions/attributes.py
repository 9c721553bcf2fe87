"""What a caption says about an item of the built-in benchmark: (field, value) mentions, read with a
lexicon of the generator's own phrases (`cartlib.data.synthetic.SYNONYMS`), and their truth.

A caption is parsed left to right by longest match over word n-grams; phrases of tables that name no
attribute ("in the", "followed by", "to the left of", ...) are matched too, so that they consume
their words, but yield no mention. A mention is true when some part of the item (or its scene) has
that value for that field; `attribute_accuracy` = true mentions / mentions, `attribute_recall` = the
share of the item's distinct (field, value) pairs that a caption states (mean over captions).
"""
from __future__ import annotations

import functools
import re
from typing import NamedTuple, Sequence

from cartlib.data import synthetic

# tables whose phrases say an attribute field under another name
_FIELD_OF_TABLE = {"pitch_post": "pitch", "motion_ing": "motion"}
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")

Mention = tuple[str, str]  # (field, value)


class AttributeScores(NamedTuple):
    accuracy: float  # true mentions / mentions (nan without mentions)
    recall: float  # mean over captions of (distinct true pairs stated / the item's pairs)
    n_captions: int
    n_mentions: int
    n_true: int


def _words(text: str) -> list[str]:
    return _WORD.findall(str(text).lower())


@functools.cache
def lexicon(task: str) -> dict[tuple[str, ...], Mention | None]:
    """Word tuple → (field, value), or None for a phrase that names no attribute; only `task`'s tables."""
    fields = {name for name, _ in synthetic.PART_FIELDS[task]} | {synthetic.SCENE_FIELD[task][0]}
    out: dict[tuple[str, ...], Mention | None] = {}
    for table, values in synthetic.TASK_TABLES[task].items():
        field = _FIELD_OF_TABLE.get(table, table)
        for value in values:
            for phrase in synthetic.SYNONYMS[table][value]:
                key = tuple(_words(phrase))
                mention = (field, value) if field in fields else None
                if out.get(key, mention) != mention:  # the generator's phrases are unambiguous per task
                    raise ValueError(f"{task}: phrase {phrase!r} means both {out[key]} and {mention}")
                out[key] = mention
    return out


def mentions(text: str, task: str) -> list[Mention]:
    """The (field, value) mentions of `text`, in order (longest match first at each word)."""
    lex = lexicon(task)
    longest = max(map(len, lex))
    words = _words(text)
    out, i = [], 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            key = tuple(words[i:i + n])
            if key in lex:
                if lex[key] is not None:
                    out.append(lex[key])
                i += n
                break
        else:
            i += 1
    return out


def item_pairs(task: str, attributes: dict) -> set[Mention]:
    """The distinct (field, value) pairs true of an item: every field of every part, and the scene."""
    pairs = {(name, part[name]) for part in attributes[synthetic.PART_KEY[task]] for name, _ in synthetic.PART_FIELDS[task]}
    scene = synthetic.SCENE_FIELD[task][0]
    return pairs | {(scene, attributes[scene])}


def attribute_scores(captions: Sequence[Sequence[str]], attributes: Sequence[dict], *, task: str) -> AttributeScores:
    """Scores of `captions[i]` (any number per item) against `attributes[i]` (micro-averaged mentions)."""
    if len(captions) != len(attributes):
        raise ValueError(f"{len(captions)} caption lists for {len(attributes)} items")
    n_caps = n_mentions = n_true = 0
    recall_sum = 0.0
    for texts, attrs in zip(captions, attributes):
        truth = item_pairs(task, attrs)
        for text in texts:
            said = mentions(text, task)
            n_caps += 1
            n_mentions += len(said)
            n_true += sum(m in truth for m in said)
            recall_sum += len(set(said) & truth) / len(truth)
    nan = float("nan")
    return AttributeScores(n_true / n_mentions if n_mentions else nan, recall_sum / n_caps if n_caps else nan,
                           n_caps, n_mentions, n_true)
