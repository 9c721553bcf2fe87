"""The built-in benchmark: rendered images, audio and video with captions, deterministic from a seed.

Nothing is downloaded: every item is a small scene drawn from a discrete attribute space and
rendered into real media with vectorised numpy.

Attribute spaces (one "part" = an object or a sound event; see `PART_FIELDS`):
- image: 1–3 objects, each (position on a 3×3 grid, shape, colour, size), plus a background;
  objects sit in distinct cells. About 3·10⁹ combinations.
- audio: 1–3 events in time order, each (kind, pitch, loudness, rhythm), plus an ambience.
  About 1.2·10⁷ combinations.
- video: 1–2 objects, each (shape, colour, size, motion, speed), plus a background; objects in one
  clip differ in (shape, colour), and circles and rings never spin (no pixel would change).
  About 9·10⁶ combinations.
`n_combinations(task)` counts them exactly. Attribute combinations are unique over the whole
generated set (all splits): an item whose key was already seen is redrawn. With probability
`NEAR_DUPLICATE_RATE` an item starts from the previous item and changes one attribute, so the set
holds many near-duplicates that a caption has to tell apart.

Reference captions (the queries) come from a small grammar:
    caption  := TEMPLATE(parts in some order, scene phrase or nothing)
    part     := noun phrase [+ location | + motion verb phrase]        (image / video)
              | noun phrase of a sound event                           (audio)
    noun phrase := article [size] colour shape          ("np-adj": "a small red circle")
                 | article [size] shape "in" colour     ("np-post": "a small circle in red")
                 | article [loudness] [rhythm] pitch kind           ("np-adj", audio)
                 | article [loudness] [rhythm] kind pitch-phrase    ("np-post": "a beep at a high pitch")
Every word slot says the plain word of `SYNONYMS[table][value]` or, with probability
`SYNONYM_RATE[task]`, one of its alternatives ("red" / "crimson" / "scarlet"). Attributes named in
`OPTIONAL_ATTRIBUTES` are left out with probability `CAPTION_DROP_RATE[task]` each (size,
loudness, background, ...); object identities (shape and colour, event kind and pitch), image
positions (in "X above Y" the second one relative to the first) and video motions are always said.
Image and video parts are reordered with probability `SHUFFLE_RATE`; audio keeps time order, but
some templates say it backwards ("a buzz, preceded by a beep"). `TEMPLATES[task]` holds the templates ("there is ...",
"a picture of ...", "X above Y", passive "... is drawn in ...", "you can hear ...",
"a clip where ...", ...). Every choice is recorded as a rule id (`template:…`, `syn:…`, `form:…`);
`caption_item` returns them with each caption and `grammar_rules(task)` lists all of them.

Complete qrels: while a caption is written, what it states is recorded as a `Statement` (per part
the (field, value) pairs said; the scene if said; "X above Y" as a relation between two parts,
read literally on the grid; whether it states the audio time order: every template but "count").
`consistent` decides whether an item satisfies a statement (same number of parts, some
assignment of the caption's parts to the item's under which everything said holds), and
`relevant_items` finds every such item of a gallery, pre-grouped by the always-said identity fields.

Pseudo-captions come from a deliberately imperfect "captioner" with one plain style (the first
synonym of every table: "a small red circle in the top left on a dark background"). Each attribute
mention is, with probability `captioner_error_rate`, dropped (share `PSEUDO_DROP_SHARE`) or
confused with another value of the same attribute; `PseudoCaption` counts both.

Splits: global indices [0, n_test) are test items, then n_train train items, then n_val val items
(appended last, so adding them changes no test or train item's bytes).

Determinism: item i draws everything from `np.random.default_rng([seed, task index, i])`, given the
previous item and the set of keys seen before it (both independent of chunking), in the order
attributes → media nuisance → pseudo-captions → captions (so a grammar change never changes the
media); rendering is elementwise per item (no batch-dependent reductions), so the bytes do not
depend on `chunk_size`.
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

TASKS = ("image", "audio", "video")
SAMPLE_RATE = 16000

IMAGE_SIZE = 64  # pixels per side
AUDIO_SECONDS = 1.0
VIDEO_FRAMES = 8
VIDEO_SIZE = 32

# ---- knobs of difficulty -------------------------------------------------------------------
# P(1 part), P(2 parts), ...: more parts = longer captions and more attribute binding to learn.
# Image objects need distinct cells (≤ 9); the video layout places at most 2 objects apart.
N_PARTS_WEIGHTS = {"image": (1 / 3, 1 / 3, 1 / 3), "audio": (1 / 3, 1 / 3, 1 / 3), "video": (0.4, 0.6)}
NEAR_DUPLICATE_RATE = 0.25  # chance that an item is the previous one with one attribute changed
# Chance that a word slot says one of the alternative synonyms instead of the plain word. The
# strongest knob: in the frozen MiniLM space a synonym moves a caption more than an attribute does.
# Text-only ceiling (R@1 of a query caption against the plain descriptions of 1,000 test items,
# MiniLM): image 0.25 / 0.44 / 0.62 at rates 0.67 (uniform) / 0.4 / 0.2; audio 0.10 / 0.24 at
# 0.67 / 0.4 and 0.46 at 0.2 with drop 0.2; video 0.34 / 0.54 at 0.67 / 0.4.
SYNONYM_RATE = {"image": 0.25, "audio": 0.15, "video": 0.3}
CAPTION_DROP_RATE = {"image": 0.3, "audio": 0.2, "video": 0.3}  # chance to leave out an optional attribute mention
OPTIONAL_ATTRIBUTES = {  # attributes a reference caption may leave out (identities are always said)
    "image": ("size", "background"),
    "audio": ("loudness", "rhythm", "ambience"),
    "video": ("size", "speed", "background"),
}
SHUFFLE_RATE = 0.5  # chance that an image/video caption lists its objects in a random order
PSEUDO_DROP_SHARE = 0.5  # of the captioner's errors, the share that drops (the rest confuse)
MAX_FILL = 0.25  # at most this share of the attribute space is generated (keeps redraws O(1))
MAX_REDRAWS = 10_000  # safety net of the uniqueness loop

# ---- vocabularies (the first synonym of each value is the captioner's plain word) ------------
COLOURS = {  # name → RGB
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (140, 50, 190), "pink": (245, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart")
IMAGE_RADII = {"small": 5.0, "medium": 8.0, "large": 11.0}  # pixels on the 64-pixel canvas
POSITIONS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
BACKGROUNDS = ("plain-dark", "plain-light", "stripes", "dots", "noise")
EVENTS = ("tone", "chirp-up", "chirp-down", "noise-burst", "click-train", "buzz", "warble", "siren")
PITCHES_HZ = {"low": 220.0, "mid": 660.0, "high": 1980.0}
LOUDNESS_AMPLITUDE = {"quiet": 0.12, "loud": 0.5}
RHYTHMS = ("short", "long", "repeated")
AMBIENCES = ("silence", "hum", "hiss", "rumble")
VIDEO_RADII = {"small": 4.5, "large": 7.0}  # pixels on the 32-pixel frames
MOTIONS = ("left", "right", "up", "down", "spin-cw", "spin-ccw", "grow", "shrink")
SPEEDS = ("slow", "fast")
SPIN_FREE_SHAPES = ("circle", "ring")  # spinning them changes no pixel, so they never spin

PART_KEY = {"image": "objects", "audio": "events", "video": "objects"}
SCENE_FIELD = {"image": ("background", BACKGROUNDS), "audio": ("ambience", AMBIENCES),
               "video": ("background", BACKGROUNDS)}
PART_FIELDS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "image": (("position", POSITIONS), ("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", tuple(IMAGE_RADII))),
    "audio": (("kind", EVENTS), ("pitch", tuple(PITCHES_HZ)), ("loudness", tuple(LOUDNESS_AMPLITUDE)),
              ("rhythm", RHYTHMS)),
    "video": (("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", tuple(VIDEO_RADII)), ("motion", MOTIONS),
              ("speed", SPEEDS)),
}
ORDERED = {"image": False, "audio": True, "video": False}  # audio events keep their time order
DISTINCT_FIELDS = {"image": ("position",), "audio": (), "video": ("shape", "colour")}  # within one item

RELATIONS = ("above", "below", "left-of", "right-of")

SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {
        "red": ("red", "crimson", "scarlet"), "orange": ("orange", "tangerine", "amber"),
        "yellow": ("yellow", "gold", "lemon yellow"), "green": ("green", "emerald", "grass green"),
        "cyan": ("cyan", "turquoise", "aqua"), "blue": ("blue", "cobalt", "royal blue"),
        "purple": ("purple", "violet", "plum"), "pink": ("pink", "rose", "hot pink"),
    },
    "shape": {
        "circle": ("circle", "round disc", "ball"), "square": ("square", "box", "block"),
        "triangle": ("triangle", "triangular shape", "wedge"), "star": ("star", "five-pointed star", "star shape"),
        "cross": ("cross", "plus sign", "plus shape"), "ring": ("ring", "hollow circle", "donut"),
        "diamond": ("diamond", "rhombus", "lozenge"), "heart": ("heart", "heart shape", "love heart"),
    },
    "size": {
        "small": ("small", "tiny", "little"), "medium": ("medium", "medium-sized", "mid-sized"),
        "large": ("large", "big", "huge"),
    },
    "position": {
        "top-left": ("top left", "upper left corner", "top-left corner"),
        "top": ("top centre", "top middle", "upper middle"),
        "top-right": ("top right", "upper right corner", "top-right corner"),
        "left": ("middle left", "left side", "centre left"),
        "centre": ("centre", "middle", "center"),
        "right": ("middle right", "right side", "centre right"),
        "bottom-left": ("bottom left", "lower left corner", "bottom-left corner"),
        "bottom": ("bottom centre", "bottom middle", "lower middle"),
        "bottom-right": ("bottom right", "lower right corner", "bottom-right corner"),
    },
    "location": {"in": ("in the", "at the")},
    "background": {
        "plain-dark": ("dark background", "black background", "plain dark backdrop"),
        "plain-light": ("light background", "white background", "plain pale backdrop"),
        "stripes": ("striped background", "background of stripes", "stripy backdrop"),
        "dots": ("dotted background", "polka-dot backdrop", "background of dots"),
        "noise": ("noisy background", "grainy backdrop", "speckled background"),
    },
    "backdrop": {"on": ("on", "against")},
    "relation": {
        "above": ("above", "over", "higher than"), "below": ("below", "under", "beneath"),
        "left-of": ("to the left of", "left of"), "right-of": ("to the right of", "right of"),
    },
    "drawn": {"drawn": ("drawn", "shown", "placed", "painted")},
    "frame": {
        "image": ("a picture of", "an image of", "a drawing of"),
        "audio": ("a recording of", "a sound clip of", "audio of"),
        "video": ("a video of", "a clip of", "footage of"),
    },
    "thing": {"object": ("shape", "object", "figure"), "sound": ("sound", "sound event", "audio event")},
    "kind": {
        "tone": ("tone", "beep", "pure tone", "whistle"),
        "chirp-up": ("rising chirp", "upward sweep", "rising whistle"),
        "chirp-down": ("falling chirp", "downward sweep", "falling whistle"),
        "noise-burst": ("noise burst", "burst of static", "whoosh"),
        "click-train": ("click train", "series of clicks", "rapid clicking"),
        "buzz": ("buzz", "buzzing sound", "harsh drone"),
        "warble": ("warble", "wobbling tone", "vibrato tone"),
        "siren": ("two-tone siren", "siren", "alternating two-note tone"),
    },
    "pitch": {
        "low": ("low", "deep", "low-pitched"), "mid": ("mid-pitched", "medium-pitched", "mid-range"),
        "high": ("high", "shrill", "high-pitched"),
    },
    "pitch_post": {
        "low": ("at a low pitch", "with a low pitch", "in a low register"),
        "mid": ("at a medium pitch", "with a mid-range pitch", "in a middle register"),
        "high": ("at a high pitch", "with a high pitch", "in a high register"),
    },
    "loudness": {"quiet": ("quiet", "soft", "faint"), "loud": ("loud", "strong", "intense")},
    "rhythm": {
        "short": ("short", "brief", "quick"), "long": ("long", "sustained", "drawn-out"),
        "repeated": ("repeated", "pulsing", "stuttering"),
    },
    "ambience": {
        "silence": ("in silence", "with no background noise", "against a silent background"),
        "hum": ("over a low hum", "with a humming background", "over mains hum"),
        "hiss": ("over background hiss", "with a hissing background", "over white noise"),
        "rumble": ("over a low rumble", "with rumbling in the background", "over a deep rumble"),
    },
    "connective": {"then": ("then", "followed by", "and then")},
    "only": {"only": ("just", "only", "nothing but")},
    "motion": {
        "left": ("moves left", "slides to the left", "drifts leftwards"),
        "right": ("moves right", "slides to the right", "drifts rightwards"),
        "up": ("moves up", "rises", "floats upwards"), "down": ("moves down", "falls", "sinks"),
        "spin-cw": ("spins clockwise", "rotates clockwise", "turns clockwise"),
        "spin-ccw": ("spins anticlockwise", "rotates counterclockwise", "turns anticlockwise"),
        "grow": ("grows", "gets bigger", "expands"), "shrink": ("shrinks", "gets smaller", "contracts"),
    },
    "motion_ing": {
        "left": ("moving left", "sliding to the left", "drifting leftwards"),
        "right": ("moving right", "sliding to the right", "drifting rightwards"),
        "up": ("moving up", "rising", "floating upwards"), "down": ("moving down", "falling", "sinking"),
        "spin-cw": ("spinning clockwise", "rotating clockwise", "turning clockwise"),
        "spin-ccw": ("spinning anticlockwise", "rotating counterclockwise", "turning anticlockwise"),
        "grow": ("growing", "getting bigger", "expanding"), "shrink": ("shrinking", "getting smaller", "contracting"),
    },
    "speed": {"slow": ("slowly", "gently", "at a slow pace"), "fast": ("quickly", "rapidly", "at high speed")},
    "clip": {"where": ("a clip where", "a video in which", "an animation where")},
}

# The (table, values) pairs each task's grammar can reach; `grammar_rules` enumerates them.
TASK_TABLES: dict[str, dict[str, tuple[str, ...]]] = {
    "image": {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(IMAGE_RADII), "position": POSITIONS,
              "location": ("in",), "background": BACKGROUNDS, "backdrop": ("on",), "relation": RELATIONS,
              "drawn": ("drawn",), "frame": ("image",), "thing": ("object",)},
    "audio": {"kind": EVENTS, "pitch": tuple(PITCHES_HZ), "pitch_post": tuple(PITCHES_HZ),
              "loudness": tuple(LOUDNESS_AMPLITUDE), "rhythm": RHYTHMS, "ambience": AMBIENCES,
              "connective": ("then",), "only": ("only",), "frame": ("audio",), "thing": ("sound",)},
    "video": {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(VIDEO_RADII), "motion": MOTIONS,
              "motion_ing": MOTIONS, "speed": SPEEDS, "background": BACKGROUNDS, "backdrop": ("on",),
              "frame": ("video",), "clip": ("where",), "thing": ("object",)},
}
FORMS = {  # non-template choices, recorded as `form:<name>`
    "image": ("np-adj", "np-post", "shuffled", *(f"omit-{a}" for a in OPTIONAL_ATTRIBUTES["image"])),
    "audio": ("np-adj", "np-post", *(f"omit-{a}" for a in OPTIONAL_ATTRIBUTES["audio"])),
    "video": ("np-adj", "np-post", "shuffled", *(f"omit-{a}" for a in OPTIONAL_ATTRIBUTES["video"])),
}
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five")


# ---- public types -------------------------------------------------------------------------
class Statement(NamedTuple):
    """What one reference caption says about its item, recorded while it is written (exact, no
    text matching): the ground truth of complete qrels (`consistent`, `relevant_items`)."""
    parts: tuple[tuple[tuple[str, str], ...], ...]  # per part, in the caption's order: (field, value) pairs said
    scene: str | None  # background / ambience, None when left out
    relations: tuple[tuple[int, str, int], ...]  # (a, relation, b): part a is <relation> part b ("X above Y")
    ordered: bool  # the parts are said in the item's part order (audio time order)


class Chunk(NamedTuple):
    """One streamed block of consecutive items (test items, then train items, then val items)."""
    item_ids: list[str]  # "<task>-<7-digit global index>"
    splits: list[str]  # "test", "train" or "val"
    media: np.ndarray  # (n, *media_shape(task)), media_dtype(task)
    attributes: list[dict]  # JSON-serialisable ground truth, canonical part order
    captions: list[list[str]]  # n_captions reference captions per item (the queries)
    pseudo_captions: list[list[str]]  # n_pseudo captions per item from the imperfect captioner
    statements: list[list[Statement]]  # what each reference caption says (same shape as `captions`)


class Caption(NamedTuple):
    text: str
    rules: tuple[str, ...]  # the grammar rules it used: template:…, syn:table:value:i, form:…
    statement: Statement  # the attribute constraints it states


class PseudoCaption(NamedTuple):
    text: str
    n_mentions: int  # attribute mentions the captioner attempted
    n_dropped: int  # of those, left out
    n_confused: int  # of those, replaced by a wrong value of the same attribute

    @property
    def n_corrupted(self) -> int:
        return self.n_dropped + self.n_confused


class Template(NamedTuple):
    name: str
    min_parts: int
    max_parts: int
    render: Callable[["_Writer", list[dict], str | None], str]  # (writer, parts, scene or None) → text
    states_order: bool = True  # False: lists the parts without saying their (time) order ("count")


TEMPLATES: dict[str, dict[str, Template]] = {task: {} for task in TASKS}


def media_shape(task: str) -> tuple[int, ...]:
    """Shape of one item's media."""
    _check_task(task)
    return {"image": (IMAGE_SIZE, IMAGE_SIZE, 3), "audio": (int(SAMPLE_RATE * AUDIO_SECONDS),),
            "video": (VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3)}[task]


def media_dtype(task: str) -> np.dtype:
    """dtype of the media: uint8 pixels, float16 audio samples in [-1, 1]."""
    _check_task(task)
    return np.dtype(np.float16) if task == "audio" else np.dtype(np.uint8)


def grammar_rules(task: str) -> frozenset[str]:
    """Every rule id the caption grammar of `task` can use (templates, synonyms, forms)."""
    _check_task(task)
    rules = {f"template:{task}:{name}" for name in TEMPLATES[task]}
    rules |= {f"form:{name}" for name in FORMS[task]}
    for table, values in TASK_TABLES[task].items():
        for value in values:
            rules |= {f"syn:{table}:{value}:{i}" for i in range(len(SYNONYMS[table][value]))}
    return frozenset(rules)


def n_combinations(task: str) -> int:
    """Exact size of the attribute space of `task` (part counts with non-zero weight only)."""
    _check_task(task)
    counts = [w > 0 for w in N_PARTS_WEIGHTS[task]]
    n_scene = len(SCENE_FIELD[task][1])
    if task == "image":
        per_object = len(SHAPES) * len(COLOURS) * len(IMAGE_RADII)
        total = sum(math.comb(len(POSITIONS), k) * per_object ** k for k, ok in enumerate(counts, 1) if ok)
    elif task == "audio":
        per_event = math.prod(len(v) for _, v in PART_FIELDS["audio"])
        total = sum(per_event ** k for k, ok in enumerate(counts, 1) if ok)
    else:  # pick k distinct (shape, colour) groups, then one object (size, motion, speed) from each
        group_sizes = [len(VIDEO_RADII) * len(SPEEDS) * sum(1 for m in MOTIONS
                                                             if not (s in SPIN_FREE_SHAPES and m.startswith("spin")))
                       for s in SHAPES for _ in COLOURS]
        e = [1] + [0] * len(counts)  # elementary symmetric polynomials of the group sizes
        for g in group_sizes:
            for k in range(len(counts), 0, -1):
                e[k] += e[k - 1] * g
        total = sum(e[k] for k, ok in enumerate(counts, 1) if ok)
    return total * n_scene


# ---- attributes ---------------------------------------------------------------------------
def sample_attributes(*, task: str, rng: np.random.Generator) -> dict:
    """Draw one valid attribute set (canonical part order) uniformly per field."""
    fields = PART_FIELDS[task]
    weights = N_PARTS_WEIGHTS[task]
    x, k = rng.random() * sum(weights), 1
    while k < len(weights) and x >= weights[k - 1]:  # k parts with probability weights[k - 1]
        x -= weights[k - 1]
        k += 1
    scene_name, scene_vocab = SCENE_FIELD[task]
    while True:  # rejection of invalid combinations (shared cells, spinning circles): few redraws
        u = rng.random(k * len(fields) + 1).tolist()
        parts = [{name: vocab[int(u[j * len(fields) + f] * len(vocab))] for f, (name, vocab) in enumerate(fields)}
                 for j in range(k)]
        attrs = {PART_KEY[task]: parts, scene_name: scene_vocab[int(u[-1] * len(scene_vocab))]}
        if _valid(task, attrs):
            return _canonical(task, attrs)


def attribute_key(task: str, attributes: dict) -> int:
    """A compact exact key of an attribute set (mixed radix; the part count is the last digit)."""
    key = 0
    for part in attributes[PART_KEY[task]]:
        for name, vocab in PART_FIELDS[task]:
            key = key * len(vocab) + _INDEX[task][name][part[name]]
    scene_name, scene_vocab = SCENE_FIELD[task]
    key = key * len(scene_vocab) + _INDEX[task][scene_name][attributes[scene_name]]
    return key * (len(N_PARTS_WEIGHTS[task]) + 1) + len(attributes[PART_KEY[task]])


def _valid(task: str, attrs: dict) -> bool:
    parts = attrs[PART_KEY[task]]
    distinct = DISTINCT_FIELDS[task]
    if distinct and len({tuple(p[f] for f in distinct) for p in parts}) < len(parts):
        return False
    if task == "video":
        return not any(p["shape"] in SPIN_FREE_SHAPES and p["motion"].startswith("spin") for p in parts)
    return True


def _canonical(task: str, attrs: dict) -> dict:
    """Unordered parts (image/video objects) are sorted by their field indices: one form per set."""
    if ORDERED[task]:
        return attrs
    fields = PART_FIELDS[task]
    parts = sorted(attrs[PART_KEY[task]], key=lambda p: tuple(_INDEX[task][n][p[n]] for n, _ in fields))
    return {**attrs, PART_KEY[task]: parts}


def _mutate(task: str, attrs: dict, rng: np.random.Generator) -> dict:
    """The same scene with one attribute (of one part, or the scene) changed to another value."""
    fields = PART_FIELDS[task]
    scene_name, scene_vocab = SCENE_FIELD[task]
    for _ in range(20):
        parts = [dict(p) for p in attrs[PART_KEY[task]]]
        scene = attrs[scene_name]
        slot = int(rng.random() * (len(parts) * len(fields) + 1))
        if slot == len(parts) * len(fields):
            scene = _other(scene_vocab, scene, rng.random())
        else:
            j, f = divmod(slot, len(fields))
            name, vocab = fields[f]
            parts[j][name] = _other(vocab, parts[j][name], rng.random())
        new = {PART_KEY[task]: parts, scene_name: scene}
        if _valid(task, new):
            return _canonical(task, new)
    return sample_attributes(task=task, rng=rng)


def _other(vocab: tuple[str, ...], value: str, u: float) -> str:
    """A value of `vocab` other than `value`, uniformly (u in [0, 1))."""
    if len(vocab) < 2:
        return value
    return vocab[(vocab.index(value) + 1 + int(u * (len(vocab) - 1))) % len(vocab)]


# task → field → value → index (per task: "size" has three values for images, two for video)
_INDEX: dict[str, dict[str, dict[str, int]]] = {
    task: {name: {v: i for i, v in enumerate(vocab)} for name, vocab in (*PART_FIELDS[task], SCENE_FIELD[task])}
    for task in TASKS}


# ---- reference captions -------------------------------------------------------------------
class _Writer:
    """Draws decisions from an rng in blocks (few rng calls) and records the rules a caption uses.

    This runs ~100 times per item, so the hot methods avoid helper calls and string formatting.
    """
    _BLOCK = 128

    def __init__(self, rng: np.random.Generator, task: str):
        self._rng, self.task = rng, task
        self._optional = OPTIONAL_ATTRIBUTES[task]
        self._drop_rate, self._synonym_rate = CAPTION_DROP_RATE[task], SYNONYM_RATE[task]
        self._u: list[float] = []
        self.rules: list[str] = []
        self.said: dict[int, dict[str, str]] = {}  # id(part) → the fields a caption has said of it
        self.relations: list[tuple[int, str, int]] = []  # (id(a), relation, id(b))

    def start(self) -> None:
        """Forget what the previous caption recorded."""
        self.rules, self.said, self.relations = [], {}, []

    def state(self, part: dict, *fields: str) -> None:
        """Record that the caption says `fields` of `part` (no rng draw: the text never changes)."""
        said = self.said.setdefault(id(part), {})
        for field in fields:
            said[field] = part[field]

    def u(self) -> float:
        if not self._u:
            self._u = self._rng.random(self._BLOCK).tolist()
        return self._u.pop()

    def index(self, n: int) -> int:
        return int(self.u() * n)

    def chance(self, p: float) -> bool:
        return self.u() < p

    def syn(self, table: str, value: str) -> str:
        options = SYNONYMS[table][value]
        i = 0  # the plain word, unless an alternative is drawn
        if len(options) > 1 and self.u() < self._synonym_rate:
            i = 1 + int(self.u() * (len(options) - 1))
        self.rules.append(_SYN_RULES[table][value][i])
        return options[i]

    def form(self, name: str) -> None:
        self.rules.append("form:" + name)

    def keep(self, field: str) -> bool:
        """False (and recorded) when an optional attribute mention is left out."""
        if field in self._optional and self.u() < self._drop_rate:
            self.rules.append("form:omit-" + field)
            return False
        return True


_SYN_RULES = {table: {value: tuple(f"syn:{table}:{value}:{i}" for i in range(len(options)))
                      for value, options in values.items()} for table, values in SYNONYMS.items()}


def _template(task: str, name: str, *, min_parts: int = 1, max_parts: int = 99, states_order: bool = True):
    def register(fn):
        TEMPLATES[task][name] = Template(name, min_parts, max_parts, fn, states_order)
        return fn
    return register


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _count(w: _Writer, n: int, thing: str) -> str:
    noun = w.syn("thing", thing)
    return f"{COUNT_WORDS[n] if n < len(COUNT_WORDS) else n} {noun}{'s' if n != 1 else ''}"


def _object_np(w: _Writer, part: dict) -> str:
    """[size] colour shape, or [size] shape in colour (image and video objects)."""
    size = ""
    if w.keep("size"):
        size = w.syn("size", part["size"])
        w.state(part, "size")
    colour, shape = w.syn("colour", part["colour"]), w.syn("shape", part["shape"])
    w.state(part, "colour", "shape")
    if w.chance(0.5):
        w.form("np-adj")
        words = (size, colour, shape)
    else:
        w.form("np-post")
        words = (size, shape, "in", colour)
    return _a(" ".join(x for x in words if x))


def _loc(w: _Writer, part: dict) -> str:
    w.state(part, "position")
    return f"{w.syn('location', 'in')} {w.syn('position', part['position'])}"


def _backdrop(w: _Writer, scene: str | None) -> str:
    """' on a dark background', or '' when the background is left out."""
    return f" {w.syn('backdrop', 'on')} {_a(w.syn('background', scene))}" if scene else ""


def _relation(a: dict, b: dict) -> str:
    (ra, ca), (rb, cb) = divmod(POSITIONS.index(a["position"]), 3), divmod(POSITIONS.index(b["position"]), 3)
    if ra != rb:
        return "above" if ra < rb else "below"
    return "left-of" if ca < cb else "right-of"


def _placed(w: _Writer, parts: list[dict]) -> list[str]:
    return [f"{_object_np(w, p)} {_loc(w, p)}" for p in parts]


@_template("image", "list")
def _image_list(w, parts, scene):
    return _join(_placed(w, parts)) + _backdrop(w, scene)


@_template("image", "there-is")
def _image_there_is(w, parts, scene):
    return "there is " + _join(_placed(w, parts)) + _backdrop(w, scene)


@_template("image", "picture-of")
def _image_picture_of(w, parts, scene):
    return f"{w.syn('frame', 'image')} " + _join(_placed(w, parts)) + _backdrop(w, scene)


@_template("image", "location-first")
def _image_location_first(w, parts, scene):
    return ", and ".join(f"{_loc(w, p)} there is {_object_np(w, p)}" for p in parts) + _backdrop(w, scene)


@_template("image", "passive")
def _image_passive(w, parts, scene):
    return ", and ".join(f"{_object_np(w, p)} is {w.syn('drawn', 'drawn')} {_loc(w, p)}" for p in parts) \
        + _backdrop(w, scene)


@_template("image", "relative", min_parts=2)
def _image_relative(w, parts, scene):
    a, b, *rest = parts
    relation = _relation(a, b)
    w.relations.append((id(a), relation, id(b)))  # b's own position is not said
    text = f"{_object_np(w, a)} {_loc(w, a)}, {w.syn('relation', relation)} {_object_np(w, b)}"
    return text + "".join(f", and {x}" for x in _placed(w, rest)) + _backdrop(w, scene)


@_template("image", "count")
def _image_count(w, parts, scene):
    return f"{_count(w, len(parts), 'object')}{_backdrop(w, scene)}: " + _join(_placed(w, parts))


@_template("image", "background-first")
def _image_background_first(w, parts, scene):
    head = _a(w.syn("background", scene)) if scene else "a scene"
    return f"{head} with " + _join(_placed(w, parts))


def _event_np(w: _Writer, part: dict) -> str:
    """[loudness] [rhythm] pitch kind, or [loudness] [rhythm] kind pitch-phrase."""
    loud = rhythm = ""
    if w.keep("loudness"):
        loud = w.syn("loudness", part["loudness"])
        w.state(part, "loudness")
    if w.keep("rhythm"):
        rhythm = w.syn("rhythm", part["rhythm"])
        w.state(part, "rhythm")
    kind = w.syn("kind", part["kind"])
    w.state(part, "kind", "pitch")
    if w.chance(0.5):
        w.form("np-adj")
        words = (loud, rhythm, w.syn("pitch", part["pitch"]), kind)
    else:
        w.form("np-post")
        words = (loud, rhythm, kind, w.syn("pitch_post", part["pitch"]))
    return _a(" ".join(x for x in words if x))


def _ambience(w: _Writer, scene: str | None) -> str:
    return f" {w.syn('ambience', scene)}" if scene else ""


def _sequence(w: _Writer, parts: list[dict]) -> str:
    events = [_event_np(w, p) for p in parts]
    return events[0] + "".join(f", {w.syn('connective', 'then')} {e}" for e in events[1:])


@_template("audio", "you-hear")
def _audio_you_hear(w, parts, scene):
    return "you can hear " + _sequence(w, parts) + _ambience(w, scene)


@_template("audio", "sequence", min_parts=2)
def _audio_sequence(w, parts, scene):
    return _sequence(w, parts) + _ambience(w, scene)


@_template("audio", "first-finally", min_parts=2)
def _audio_first_finally(w, parts, scene):
    events = [_event_np(w, p) for p in parts]
    middle = "".join(f", then {e}" for e in events[1:-1])
    return f"first {events[0]}{middle}, and finally {events[-1]}" + _ambience(w, scene)


@_template("audio", "passive", min_parts=2)
def _audio_passive(w, parts, scene):
    events = [_event_np(w, p) for p in parts]
    text = f"{events[0]} is followed by {events[1]}" + "".join(f", which is followed by {e}" for e in events[2:])
    return text + _ambience(w, scene)


@_template("audio", "preceded", min_parts=2)
def _audio_preceded(w, parts, scene):
    """Time order said backwards: the last event first."""
    events = [_event_np(w, p) for p in parts][::-1]
    return f"{events[0]}, preceded by " + " and before that ".join(events[1:]) + _ambience(w, scene)


@_template("audio", "recording")
def _audio_recording(w, parts, scene):
    return f"{w.syn('frame', 'audio')} " + _sequence(w, parts) + _ambience(w, scene)


@_template("audio", "single", max_parts=1)
def _audio_single(w, parts, scene):
    return f"{w.syn('only', 'only')} {_event_np(w, parts[0])}" + _ambience(w, scene)


@_template("audio", "count", states_order=False)
def _audio_count(w, parts, scene):
    return f"{_count(w, len(parts), 'sound')}{_ambience(w, scene)}: " + _join([_event_np(w, p) for p in parts])


@_template("audio", "ambience-first")
def _audio_ambience_first(w, parts, scene):
    head = w.syn("ambience", scene) if scene else "in this recording"
    return f"{head}, " + _sequence(w, parts)


def _verb(w: _Writer, part: dict, table: str = "motion") -> str:
    """motion verb phrase [+ speed adverb]."""
    verb = w.syn(table, part["motion"])
    w.state(part, "motion")
    if not w.keep("speed"):
        return verb
    w.state(part, "speed")
    return f"{verb} {w.syn('speed', part['speed'])}"


def _clauses(w: _Writer, parts: list[dict], table: str = "motion") -> list[str]:
    return [f"{_object_np(w, p)} {_verb(w, p, table)}" for p in parts]


@_template("video", "clip-where")
def _video_clip_where(w, parts, scene):
    return f"{w.syn('clip', 'where')} " + " and ".join(_clauses(w, parts)) + _backdrop(w, scene)


@_template("video", "while", min_parts=2)
def _video_while(w, parts, scene):
    return " while ".join(_clauses(w, parts)) + _backdrop(w, scene)


@_template("video", "video-of")
def _video_video_of(w, parts, scene):
    return f"{w.syn('frame', 'video')} " + " and ".join(f"{_object_np(w, p)} that {_verb(w, p)}" for p in parts) \
        + _backdrop(w, scene)


@_template("video", "we-see")
def _video_we_see(w, parts, scene):
    return "we see " + " and ".join(_clauses(w, parts, "motion_ing")) + _backdrop(w, scene)


@_template("video", "passive")
def _video_passive(w, parts, scene):
    return " and ".join(f"{_object_np(w, p)} is seen {_verb(w, p, 'motion_ing')}" for p in parts) \
        + _backdrop(w, scene)


@_template("video", "count")
def _video_count(w, parts, scene):
    return f"{_count(w, len(parts), 'object')}{_backdrop(w, scene)}: " + _join(_clauses(w, parts, "motion_ing"))


@_template("video", "background-first")
def _video_background_first(w, parts, scene):
    head = f"{w.syn('backdrop', 'on')} {_a(w.syn('background', scene))}" if scene else "in this clip"
    return f"{head}, " + " and ".join(_clauses(w, parts))


def caption_item(*, task: str, attributes: dict, rng: np.random.Generator, n: int) -> list[Caption]:
    """`n` reference captions of one item (distinct where the grammar allows), with their rules."""
    _check_task(task)
    w = _Writer(rng, task)
    parts = attributes[PART_KEY[task]]
    scene_name = SCENE_FIELD[task][0]
    templates = [t for t in TEMPLATES[task].values() if t.min_parts <= len(parts) <= t.max_parts]
    out: list[Caption] = []
    texts: set[str] = set()
    for _ in range(4 * n):
        if len(out) == n:
            break
        w.start()
        template = templates[w.index(len(templates))]
        order = list(parts)
        if not ORDERED[task] and len(order) > 1 and w.chance(SHUFFLE_RATE):
            for i in range(len(order) - 1, 0, -1):  # Fisher–Yates
                j = w.index(i + 1)
                order[i], order[j] = order[j], order[i]
            if order != parts:
                w.form("shuffled")
        scene = attributes[scene_name] if w.keep(scene_name) else None
        text = template.render(w, order, scene)
        if text not in texts:
            texts.add(text)
            out.append(Caption(text[0].upper() + text[1:], (f"template:{task}:{template.name}", *w.rules),
                               _statement(w, order, scene, ordered=ORDERED[task] and template.states_order)))
    while len(out) < n:  # a tiny grammar could run out of distinct captions: repeat rather than fail
        out.append(out[len(out) % max(1, len(texts))])
    return out


def _statement(w: _Writer, order: list[dict], scene: str | None, *, ordered: bool) -> Statement:
    """What `w` recorded for one caption of the parts `order` (the caption's part order)."""
    at = {id(p): j for j, p in enumerate(order)}
    return Statement(parts=tuple(tuple(sorted(w.said.get(id(p), {}).items())) for p in order), scene=scene,
                     relations=tuple((at[a], rel, at[b]) for a, rel, b in w.relations), ordered=ordered)


# ---- complete qrels: which items a caption is true of ------------------------------------
# Fields every reference caption says of every part: the key that pre-groups candidate items.
IDENTITY_FIELDS = {"image": ("shape", "colour"), "audio": ("kind", "pitch"), "video": ("shape", "colour")}


def _holds(relation: str, a: dict, b: dict) -> bool:
    """"a <relation> b" read literally on the 3×3 grid ("above": a higher row, whatever the columns)."""
    (ra, ca), (rb, cb) = divmod(POSITIONS.index(a["position"]), 3), divmod(POSITIONS.index(b["position"]), 3)
    return {"above": ra < rb, "below": ra > rb, "left-of": ca < cb, "right-of": ca > cb}[relation]


def consistent(*, task: str, statement: Statement, attributes: dict) -> bool:
    """True iff the item with `attributes` satisfies everything `statement` says: the same number of
    parts, and some assignment of the caption's parts to the item's (the item's order when the
    caption states it) under which every said field value and every relation holds."""
    parts = attributes[PART_KEY[task]]
    n = len(parts)
    if n != len(statement.parts):
        return False
    if statement.scene is not None and attributes[SCENE_FIELD[task][0]] != statement.scene:
        return False
    assignments = [tuple(range(n))] if statement.ordered else itertools.permutations(range(n))
    for to in assignments:  # caption part j ↔ item part to[j]
        if all(parts[to[j]][f] == v for j, said in enumerate(statement.parts) for f, v in said) and \
                all(_holds(rel, parts[to[a]], parts[to[b]]) for a, rel, b in statement.relations):
            return True
    return False


def _identity(task: str, parts: Sequence) -> tuple:
    """Sorted identity values of the parts (dicts, or a statement's (field, value) pairs)."""
    fields = IDENTITY_FIELDS[task]
    return tuple(sorted(tuple(dict(p)[f] for f in fields) for p in parts))


def relevant_items(*, task: str, statements: Sequence[Statement], attributes: Sequence[dict]) -> list[list[int]]:
    """For each statement, the positions in `attributes` of every item it is consistent with
    (ascending). Items are pre-grouped by their parts' identity fields, which every caption says, so
    only a handful of candidates per query are checked part by part."""
    _check_task(task)
    groups: dict[tuple, list[int]] = {}
    for i, attrs in enumerate(attributes):
        groups.setdefault(_identity(task, attrs[PART_KEY[task]]), []).append(i)
    return [[i for i in groups.get(_identity(task, st.parts), ())
             if consistent(task=task, statement=st, attributes=attributes[i])] for st in statements]


# ---- pseudo-captions (the imperfect captioner) -------------------------------------------
class _Captioner:
    """Says each attribute in its plain word, but drops or confuses it with probability `error_rate`."""

    def __init__(self, w: _Writer, task: str, error_rate: float):
        self.w, self.task, self.error_rate = w, task, error_rate
        self.vocab = {name: vocab for name, vocab in (*PART_FIELDS[task], SCENE_FIELD[task])}
        self.mentions = self.dropped = self.confused = 0

    def say(self, field: str, value: str, table: str | None = None) -> str:
        """Plain word of `value` ('' when dropped)."""
        self.mentions += 1
        if self.w.chance(self.error_rate):
            if self.w.chance(PSEUDO_DROP_SHARE):
                self.dropped += 1
                return ""
            self.confused += 1
            value = _other(self.vocab[field], value, self.w.u())
        return SYNONYMS[table or field][value][0]


def _words(*words: str) -> str:
    return " ".join(x for x in words if x)


def _pseudo_text(c: _Captioner, task: str, attributes: dict) -> str:
    parts = attributes[PART_KEY[task]]
    if task == "image":
        phrases = []
        for p in parts:
            size, colour = c.say("size", p["size"]), c.say("colour", p["colour"])
            shape, pos = c.say("shape", p["shape"]) or "object", c.say("position", p["position"])
            phrases.append(_words(_a(_words(size, colour, shape)), f"in the {pos}" if pos else ""))
        bg = c.say("background", attributes["background"])
        return " and ".join(phrases) + (f" on a {bg}" if bg else "")
    if task == "audio":
        phrases = []
        for p in parts:
            loud, rhythm = c.say("loudness", p["loudness"]), c.say("rhythm", p["rhythm"])
            pitch, kind = c.say("pitch", p["pitch"]), c.say("kind", p["kind"]) or "sound"
            phrases.append(_a(_words(loud, rhythm, pitch, kind)))
        amb = c.say("ambience", attributes["ambience"])
        return ", then ".join(phrases) + (f" {amb}" if amb else "")
    phrases = []
    for p in parts:
        size, colour = c.say("size", p["size"]), c.say("colour", p["colour"])
        shape = c.say("shape", p["shape"]) or "object"
        motion, speed = c.say("motion", p["motion"], "motion_ing") or "moving", c.say("speed", p["speed"])
        phrases.append(_words(_a(_words(size, colour, shape)), motion, speed))
    bg = c.say("background", attributes["background"])
    return " and ".join(phrases) + (f" on a {bg}" if bg else "")


def pseudo_caption_item(*, task: str, attributes: dict, rng: np.random.Generator, n: int,
                        error_rate: float) -> list[PseudoCaption]:
    """`n` captions of one item from the imperfect captioner, each with its error counts."""
    _check_task(task)
    w = _Writer(rng, task)
    out = []
    for _ in range(n):
        c = _Captioner(w, task, error_rate)
        text = _pseudo_text(c, task, attributes)
        out.append(PseudoCaption(text, c.mentions, c.dropped, c.confused))
    return out


# ---- rendering ----------------------------------------------------------------------------
_PART_NUISANCE = 8  # uniforms per part: position/pitch jitter, size/amplitude jitter, angle/phase, colour ×3, noise
_SCENE_NUISANCE = 6  # uniforms per item: background parameters, layout, noise offset


@functools.cache
def _noise_bank(width: int = 1) -> np.ndarray:
    """A fixed table of unit-variance noise, moving-averaged over `width` samples (low-passed).

    Items read it at random offsets: much cheaper than fresh draws or per-item filtering.
    """
    white = np.random.default_rng(20240607).standard_normal(1 << 20).astype(np.float32)
    if width == 1:
        return white
    c = np.concatenate([[0.0], np.cumsum(white, dtype=np.float64)])
    return ((c[width:] - c[:-width]) / math.sqrt(width)).astype(np.float32)


def _bank_slices(u: np.ndarray, length: int, width: int = 1) -> np.ndarray:
    """(len(u), length) noise rows starting at offsets chosen by the uniforms `u`."""
    bank = _noise_bank(width)
    starts = (np.asarray(u, dtype=np.float64) * (bank.size - length)).astype(np.int64)
    return np.stack([bank[i:i + length] for i in starts]) if len(starts) else np.zeros((0, length), np.float32)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test on shape coordinates (u right, v down, radius 1)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        d = u * u + v * v
        return (d <= 1.0) & (d >= 0.3)
    if shape == "square":
        return np.maximum(au, av) <= 0.82
    if shape == "diamond":
        return au + av <= 1.05
    if shape == "triangle":  # apex up
        return (v <= 0.75) & (au <= (v + 1.0) * 0.62)
    if shape == "cross":
        return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
    if shape == "star":  # five points, one straight up
        s = (np.arctan2(v, u) * (5 / (2 * np.pi)) + 0.25) % 1.0
        return np.sqrt(u * u + v * v) <= 0.4 + 0.65 * np.abs(s - 0.5) * 2
    if shape == "heart":
        x, y = u * 1.15, -v * 1.15 + 0.1
        q = x * x + y * y - 1.0
        return q * q * q - x * x * y * y * y <= 0.0
    raise ValueError(f"unknown shape {shape!r}")


def _paint(canvas: np.ndarray, rows: np.ndarray, shape: str, cx: np.ndarray, cy: np.ndarray, r: np.ndarray,
           angle: np.ndarray, rgb: np.ndarray) -> None:
    """Paint one shape into canvas[rows] (k, [T,] S, S, 3); cx… are (k,) or (k, T); +angle = clockwise.

    Only a square window around each object is tested (shapes fit in 1.1 radii), which is what
    keeps the renderer fast; objects are bucketed by window size so small ones test few pixels.
    Rows must be distinct so that the windows of one call never collide.
    """
    size = canvas.shape[-2]
    cx, cy, r, angle = (np.asarray(a, dtype=np.float32) for a in (cx, cy, r, angle))
    r_max = r.reshape(len(rows), -1).max(axis=1)
    boxes = np.minimum(size, 4 * np.ceil((2.2 * r_max + 2) / 4)).astype(np.int64)  # multiples of 4
    for box in np.unique(boxes):
        sel = np.flatnonzero(boxes == box)
        _paint_windows(canvas, rows[sel], shape, cx[sel], cy[sel], r[sel], angle[sel], rgb[sel], int(box))


def _paint_windows(canvas: np.ndarray, rows: np.ndarray, shape: str, cx: np.ndarray, cy: np.ndarray,
                   r: np.ndarray, angle: np.ndarray, rgb: np.ndarray, box: int) -> None:
    size = canvas.shape[-2]
    steps = np.arange(box)
    x0 = np.clip(np.floor(cx - box / 2), 0, size - box).astype(np.int64)
    y0 = np.clip(np.floor(cy - box / 2), 0, size - box).astype(np.int64)
    dx = ((x0[..., None] + steps).astype(np.float32) + 0.5 - cx[..., None]) / r[..., None]  # (k, [T,] box)
    dy = ((y0[..., None] + steps).astype(np.float32) + 0.5 - cy[..., None]) / r[..., None]
    cos, sin = np.cos(angle)[..., None, None], np.sin(angle)[..., None, None]
    u = dx[..., None, :] * cos + dy[..., :, None] * sin
    v = dy[..., :, None] * cos - dx[..., None, :] * sin
    mask = _shape_mask(shape, u, v)[..., None]  # (k, [T,] box, box, 1)
    # one flat pixel index per window pixel: a single-array gather/scatter is far cheaper than
    # broadcasting four index arrays
    frames = canvas.shape[1] if cx.ndim == 2 else 1
    image = rows.reshape(-1, *[1] * (cx.ndim - 1)) * frames + (np.arange(frames) if cx.ndim == 2 else 0)
    corner = (image * size + y0) * size + x0  # (k, [T])
    pixel = corner[..., None, None] + (steps[:, None] * size + steps)  # (k, [T,] box, box)
    flat = canvas.reshape(-1, 3)
    colour = rgb.reshape(len(rows), *([1] * (mask.ndim - 2)), 3)
    flat[pixel] = np.where(mask, colour, flat[pixel])


def _backgrounds(scene: np.ndarray, su: np.ndarray, size: int) -> np.ndarray:
    """(m, size, size, 3) uint8 backgrounds from scene indices and per-item uniforms (m, 6)."""
    out = np.empty((len(scene), size, size, 3), dtype=np.uint8)
    g = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(g, g, indexing="ij")
    for b, name in enumerate(BACKGROUNDS):
        rows = np.flatnonzero(scene == b)
        if not rows.size:
            continue
        p = su[rows].astype(np.float32)
        if name == "plain-dark":
            grey = np.broadcast_to(_lv(15 + 30 * p[:, 0]), (len(rows), size, size))
        elif name == "plain-light":
            grey = np.broadcast_to(_lv(195 + 45 * p[:, 0]), (len(rows), size, size))
        elif name == "stripes":
            period, orient = 4 + 4 * p[:, 0], (p[:, 1] * 3).astype(int)
            coord = np.where(_lv(orient) == 0, yy, np.where(_lv(orient) == 1, xx, (xx + yy) * 0.7071))
            grey = np.where(((coord / _lv(period) + _lv(p[:, 2])) % 1.0) < 0.5, 50.0, 120.0)
        elif name == "dots":
            period = _lv(6 + 3 * p[:, 0])
            ox = (xx / period + _lv(p[:, 2])) % 1.0 - 0.5
            oy = (yy / period + _lv(p[:, 3])) % 1.0 - 0.5
            grey = np.where((ox * ox + oy * oy) * period * period <= 2.0, 170.0, 75.0)
        else:  # noise: grainy grey texture
            grey = np.clip(95 + 35 * _bank_slices(p[:, 4], size * size).reshape(-1, size, size), 0, 255)
        out[rows] = np.asarray(grey, dtype=np.uint8)[..., None]
    return out


def _lv(a: np.ndarray) -> np.ndarray:
    """(k,) → (k, 1, 1), to broadcast a per-item value over a frame."""
    return a[:, None, None]


def _colours(idx: np.ndarray, u: np.ndarray) -> np.ndarray:
    """RGB of colour indices with a ±12 jitter per channel (u: (k, 3) uniforms)."""
    base = np.asarray(list(COLOURS.values()), dtype=np.float32)[idx]
    return np.clip(base + (u - 0.5) * 24, 0, 255).astype(np.uint8)


def _render_image(idx: np.ndarray, n_parts: np.ndarray, scene: np.ndarray, pu: np.ndarray,
                  su: np.ndarray) -> np.ndarray:
    """idx (m, K, 4) field indices (position, shape, colour, size); pu (m, K, 8); su (m, 6)."""
    canvas = _backgrounds(scene, su, IMAGE_SIZE)
    cell = IMAGE_SIZE / 3
    radii = np.asarray(list(IMAGE_RADII.values()), dtype=np.float32)
    for j in range(idx.shape[1]):
        for s, shape in enumerate(SHAPES):
            rows = np.flatnonzero((n_parts > j) & (idx[:, j, 1] == s))
            if not rows.size:
                continue
            p, u = idx[rows, j], pu[rows, j].astype(np.float32)
            row, col = np.divmod(p[:, 0], 3)
            cx = (col + 0.5) * cell + (u[:, 0] - 0.5) * 5  # ±2.5 px jitter stays inside the cell
            cy = (row + 0.5) * cell + (u[:, 1] - 0.5) * 5
            r = radii[p[:, 3]] * (0.92 + 0.16 * u[:, 2])
            angle = (u[:, 3] - 0.5) * 0.4  # ±11°: a square never turns into a diamond
            _paint(canvas, rows, shape, cx, cy, r, angle, _colours(p[:, 2], u[:, 4:7]))
    return canvas


_MOTION_DIR = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_STEP_PX = (1.0, 2.0)  # slow, fast: pixels per frame of a moving object
_SPIN_RAD = (math.radians(10), math.radians(24))  # per frame; under half the star's 72° symmetry
_GROWTH = (1.06, 1.13)  # radius factor per frame


def _render_video(idx: np.ndarray, n_parts: np.ndarray, scene: np.ndarray, pu: np.ndarray,
                  su: np.ndarray) -> np.ndarray:
    """idx (m, K, 5) field indices (shape, colour, size, motion, speed) → (m, T, S, S, 3) uint8."""
    T, S = VIDEO_FRAMES, VIDEO_SIZE
    canvas = np.repeat(_backgrounds(scene, su, S)[:, None], T, axis=1)
    tf = np.arange(T, dtype=np.float32) - (T - 1) / 2
    radii = np.asarray(list(VIDEO_RADII.values()), dtype=np.float32)
    dirs = np.asarray([_MOTION_DIR.get(m, (0, 0)) for m in MOTIONS], dtype=np.float32)
    spin = np.asarray([1 if m == "spin-cw" else -1 if m == "spin-ccw" else 0 for m in MOTIONS], dtype=np.float32)
    grow = np.asarray([1 if m == "grow" else -1 if m == "shrink" else 0 for m in MOTIONS], dtype=np.float32)
    # two objects sit on a diagonal (which one: per item), one object in the middle
    near, far = S * 0.33, S * 0.67
    for j in range(idx.shape[1]):
        for s, shape in enumerate(SHAPES):
            rows = np.flatnonzero((n_parts > j) & (idx[:, j, 0] == s))
            if not rows.size:
                continue
            p, u, q = idx[rows, j], pu[rows, j].astype(np.float32), su[rows].astype(np.float32)
            pair = n_parts[rows] > 1
            flip = q[:, 5] < 0.5
            bx = np.where(pair, np.where((j == 0) ^ flip, near, far), S / 2)
            by = np.where(pair, near if j == 0 else far, S / 2)
            motion, fast = p[:, 3], p[:, 4]
            step = np.asarray(_STEP_PX, dtype=np.float32)[fast][:, None] * tf
            cx = (bx + (u[:, 0] - 0.5) * 3)[:, None] + dirs[motion, 0][:, None] * step
            cy = (by + (u[:, 1] - 0.5) * 3)[:, None] + dirs[motion, 1][:, None] * step
            growth = np.asarray(_GROWTH, dtype=np.float32)[fast][:, None] ** (grow[motion][:, None] * tf)
            r = (radii[p[:, 2]] * (0.92 + 0.16 * u[:, 2]))[:, None] * growth
            omega = np.asarray(_SPIN_RAD, dtype=np.float32)[fast]
            angle = ((u[:, 3] - 0.5) * 0.4)[:, None] + (spin[motion] * omega)[:, None] * tf
            _paint(canvas, rows, shape, cx, cy, r, angle, _colours(p[:, 1], u[:, 4:7]))
    return canvas


@functools.cache
def _rhythm_templates(seg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a slot of `seg` samples: envelope (3, seg), time within the pulse τ (3, seg), pulse seconds (3,)."""
    pulses = {"short": [(0.08, 0.40)], "long": [(0.08, 0.92)],
              "repeated": [(0.08, 0.27), (0.40, 0.59), (0.72, 0.91)]}
    i = np.arange(seg, dtype=np.float64)
    ramp = 0.004 * SAMPLE_RATE  # 4 ms fades: no clicks at the edges
    env, tau, dur = np.zeros((3, seg)), np.zeros((3, seg)), np.zeros(3)
    for r, name in enumerate(RHYTHMS):
        for a, b in pulses[name]:
            a, b = a * seg, b * seg
            inside = (i >= a) & (i < b)
            env[r] = np.maximum(env[r], np.clip(np.minimum(i - a, b - i) / ramp, 0, 1) * inside)
            tau[r] = np.where(inside, (i - a) / (b - a), tau[r])
            dur[r] = (b - a) / SAMPLE_RATE
    return env.astype(np.float32), tau.astype(np.float32), dur.astype(np.float32)


def _noise_width(pitch: str) -> int:
    """Moving-average width whose pass band (~±f/4 after the carrier) suits a noise burst at `pitch`."""
    return max(1, round(2 * SAMPLE_RATE / PITCHES_HZ[pitch]))


def _event_waves(kind: str, f: np.ndarray, phase: np.ndarray, t: np.ndarray, tau: np.ndarray, dur: np.ndarray,
                 noise: np.ndarray | None) -> np.ndarray:
    """Unit-amplitude float32 waveforms (k, seg) of one event kind; f, phase, dur (k,); t (seg,); tau (k, seg)."""
    f2, ph = f[:, None], phase[:, None]
    two_pi = np.float32(2 * np.pi)
    if kind == "tone":
        return np.sin(two_pi * f2 * t + ph)
    if kind in ("chirp-up", "chirp-down"):  # one octave each way around f within every pulse
        c = np.float32(1.0 if kind == "chirp-up" else -1.0)
        scale = two_pi * f2 * dur[:, None] / np.float32(2 * c * np.log(2))
        return np.sin(scale * (np.exp2(c * (2 * tau - 1)) - np.exp2(-c)) + ph)
    if kind == "noise-burst":  # low-passed noise × carrier = a noise band around f
        return np.clip(noise * np.float32(1.1), -2.5, 2.5) * np.sin(two_pi * f2 * t + ph)
    if kind == "click-train":  # 25 clicks/s, each a decaying sinusoid at f (gain: about as loud as a tone)
        tc = t % np.float32(0.04)
        return np.float32(1.6) * np.sin(two_pi * f2 * tc) * np.exp(-tc * f2 / np.float32(5.0))
    if kind == "buzz":
        return np.float32(0.6) * np.sign(np.sin(two_pi * f2 * t + ph))
    if kind == "warble":  # ±8 % vibrato at 9 Hz
        return np.sin(two_pi * f2 * t - (np.float32(0.08 / 9) * f2) * np.cos(two_pi * 9 * t) + ph)
    if kind == "siren":  # alternates f and 4/3 f twelve times a second
        return np.sin(two_pi * f2 * (t + np.float32(1 / 3) * _square_integral(t)) + ph)
    raise ValueError(f"unknown event kind {kind!r}")


def _square_integral(t: np.ndarray) -> np.ndarray:
    """∫₀ᵗ of a 0/1 square wave with 12 cycles a second (closed form: no cumulative sums)."""
    half = np.float32(1 / 24)
    n = np.floor(t / half)
    return (np.floor(n / 2) * half + np.where(n % 2 == 1, t - n * half, 0)).astype(np.float32)


def _render_audio(idx: np.ndarray, n_parts: np.ndarray, scene: np.ndarray, pu: np.ndarray,
                  su: np.ndarray) -> np.ndarray:
    """idx (m, K, 4) field indices (kind, pitch, loudness, rhythm); events share the second in equal slots."""
    m, L = len(scene), int(SAMPLE_RATE * AUDIO_SECONDS)
    out = np.zeros((m, L), dtype=np.float32)
    hz = np.asarray(list(PITCHES_HZ.values()), dtype=np.float32)
    amp = np.asarray(list(LOUDNESS_AMPLITUDE.values()), dtype=np.float32)
    pu, su = pu.astype(np.float32), su.astype(np.float32)
    for k in range(1, idx.shape[1] + 1):
        items = np.flatnonzero(n_parts == k)
        if not items.size:
            continue
        seg = L // k
        env_t, tau_t, dur_t = _rhythm_templates(seg)
        t = np.arange(seg, dtype=np.float32) / np.float32(SAMPLE_RATE)
        for j in range(k):
            p, u = idx[items, j], pu[items, j]
            f = hz[p[:, 1]] * (np.float32(0.94) + np.float32(0.12) * u[:, 0])
            a = amp[p[:, 2]] * (np.float32(0.85) + np.float32(0.3) * u[:, 1])
            for e, kind in enumerate(EVENTS):
                for h, pitch in enumerate(PITCHES_HZ):  # grouped by pitch too: one noise band each
                    sub = np.flatnonzero((p[:, 0] == e) & (p[:, 1] == h))
                    if not sub.size:
                        continue
                    rhythm = p[sub, 3]
                    noise = _bank_slices(u[sub, 7], seg, _noise_width(pitch)) if kind == "noise-burst" else None
                    wave = _event_waves(kind, f[sub], np.float32(2 * np.pi) * u[sub, 2], t, tau_t[rhythm],
                                        dur_t[rhythm], noise)
                    out[items[sub], j * seg:(j + 1) * seg] = a[sub, None] * env_t[rhythm] * wave
    t = np.arange(L, dtype=np.float32) / np.float32(SAMPLE_RATE)
    for b, name in enumerate(AMBIENCES):
        rows = np.flatnonzero(scene == b)
        if not rows.size:
            continue
        q = su[rows]
        if name == "silence":
            bg = 0.003 * _bank_slices(q[:, 4], L)
        elif name == "hum":
            phase = np.float32(2 * np.pi) * (95 + 10 * q[:, :1]) * t
            bg = 0.04 * (np.sin(phase) + 0.5 * np.sin(2 * phase)) + 0.003 * _bank_slices(q[:, 4], L)
        elif name == "hiss":
            bg = 0.03 * _bank_slices(q[:, 4], L)
        else:  # rumble: noise low-passed below ~100 Hz, under the lowest event pitch
            bg = 0.05 * _bank_slices(q[:, 4], L, 160)
        out[rows] += bg.astype(np.float32)
    return np.clip(out, -1.0, 1.0).astype(np.float16)


_RENDER = {"image": _render_image, "audio": _render_audio, "video": _render_video}


# ---- the generator ------------------------------------------------------------------------
def generate(*, task: str, n_train: int, n_test: int, seed: int, n_val: int = 0, n_captions: int = 5,
             n_pseudo: int = 2, captioner_error_rate: float = 0.3, chunk_size: int = 1000) -> Iterator[Chunk]:
    """Stream `n_test` test items, then `n_train` train items, then `n_val` validation items, in
    chunks of at most `chunk_size`.

    Validation items are drawn exactly like the others (global indices after the train items, so
    adding them leaves every test and train item's bytes unchanged); uniqueness holds over all three.
    Same arguments → identical bytes, whatever `chunk_size`. Arguments are checked here, before the
    first chunk is asked for. Memory: one chunk plus a set of N integer keys.
    """
    _check_task(task)
    for name, value, minimum in (("n_train", n_train, 0), ("n_test", n_test, 0), ("n_val", n_val, 0), ("seed", seed, 0),
                                 ("n_captions", n_captions, 1), ("n_pseudo", n_pseudo, 0),
                                 ("chunk_size", chunk_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    total = int(n_train) + int(n_test) + int(n_val)
    if total == 0:
        raise ValueError(f"n_train + n_test + n_val must be ≥ 1, got n_train={n_train!r}, n_test={n_test!r}, "
                         f"n_val={n_val!r}")
    limit = int(MAX_FILL * n_combinations(task))
    if total > limit:
        raise ValueError(f"n_train + n_test + n_val = {total} exceeds {limit} items, {MAX_FILL:.0%} of the {task} "
                         f"attribute space (raise the vocabularies in cartlib.data.synthetic)")
    rate = captioner_error_rate
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"captioner_error_rate must be in [0, 1], got {captioner_error_rate!r}")
    return _stream(task=task, n_test=int(n_test), n_train=int(n_train), total=total, seed=int(seed), n_captions=int(n_captions),
                   n_pseudo=int(n_pseudo), error_rate=float(captioner_error_rate), chunk_size=int(chunk_size))


def _stream(*, task: str, n_test: int, n_train: int, total: int, seed: int, n_captions: int, n_pseudo: int, error_rate: float,
            chunk_size: int) -> Iterator[Chunk]:
    task_index = TASKS.index(task)
    fields = PART_FIELDS[task]
    max_parts = len(N_PARTS_WEIGHTS[task])
    scene_name = SCENE_FIELD[task][0]
    index = _INDEX[task]
    seen: set[int] = set()
    previous: dict | None = None
    for start in range(0, total, chunk_size):
        stop = min(total, start + chunk_size)
        m = stop - start
        idx = np.zeros((m, max_parts, len(fields)), dtype=np.int64)
        n_parts = np.zeros(m, dtype=np.int64)
        scene = np.zeros(m, dtype=np.int64)
        pu = np.empty((m, max_parts, _PART_NUISANCE))
        su = np.empty((m, _SCENE_NUISANCE))
        attributes, captions, pseudo, statements = [], [], [], []
        for r, i in enumerate(range(start, stop)):
            rng = np.random.default_rng([seed, task_index, i])
            for _ in range(MAX_REDRAWS):  # uniqueness over the whole set: redraw a seen key
                if previous is not None and rng.random() < NEAR_DUPLICATE_RATE:
                    attrs = _mutate(task, previous, rng)
                else:
                    attrs = sample_attributes(task=task, rng=rng)
                key = attribute_key(task, attrs)
                if key not in seen:
                    break
            else:
                raise RuntimeError(f"no unseen {task} attribute combination after {MAX_REDRAWS} draws")
            seen.add(key)
            previous = attrs
            # media nuisance first, then text: changing the grammar never changes the media
            pu[r] = rng.random((max_parts, _PART_NUISANCE))
            su[r] = rng.random(_SCENE_NUISANCE)
            parts = attrs[PART_KEY[task]]
            n_parts[r] = len(parts)
            for j, part in enumerate(parts):
                idx[r, j] = [index[name][part[name]] for name, _ in fields]
            scene[r] = index[scene_name][attrs[scene_name]]
            attributes.append(attrs)
            pseudo.append([c.text for c in pseudo_caption_item(task=task, attributes=attrs, rng=rng, n=n_pseudo,
                                                               error_rate=error_rate)])
            written = caption_item(task=task, attributes=attrs, rng=rng, n=n_captions)
            captions.append([c.text for c in written])
            statements.append([c.statement for c in written])
        yield Chunk(
            item_ids=[f"{task}-{i:07d}" for i in range(start, stop)],
            splits=[_split(i, n_test=n_test, n_train=n_train) for i in range(start, stop)],
            media=_RENDER[task](idx, n_parts, scene, pu, su),
            attributes=attributes, captions=captions, pseudo_captions=pseudo, statements=statements,
        )


def _split(i: int, *, n_test: int, n_train: int) -> str:
    """Split of global index i: test items first, then train, then val (appended: old bytes kept)."""
    return "test" if i < n_test else "train" if i < n_test + n_train else "val"


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
