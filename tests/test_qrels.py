"""Complete qrels on the built-in benchmark (issue 14 item 2): a query is relevant to every item of
its split that is consistent with everything its caption states, computed from what the generator
recorded while writing the caption (synthetic.Statement), never from the text."""
from __future__ import annotations

import numpy as np
import pytest

from cartlib.data import synthetic as S
from cartlib.stages.data import _Gallery, complete_qrels


def _obj(position, shape, colour, size="small"):
    return {"position": position, "shape": shape, "colour": colour, "size": size}


def _image(*objects, background="plain-dark"):
    return {"objects": list(objects), "background": background}


def _said(**fields):
    return tuple(sorted(fields.items()))


# "a red circle in the centre" over hand-made items: what it states, and what each item is
GALLERY = [
    _image(_obj("centre", "circle", "red", "small")),                          # 0 yes
    _image(_obj("centre", "circle", "red", "large"), background="stripes"),    # 1 yes: size, background unsaid
    _image(_obj("top-left", "circle", "red", "small")),                        # 2 no: position
    _image(_obj("centre", "circle", "blue", "small")),                         # 3 no: colour
    _image(_obj("centre", "circle", "red"), _obj("top", "square", "blue")),    # 4 no: two objects
]


def test_hand_built_query_lists_exactly_the_consistent_items():
    st = S.Statement(parts=(_said(shape="circle", colour="red", position="centre"),), scene=None, relations=(),
                     ordered=False)
    assert S.relevant_items(task="image", statements=[st], attributes=GALLERY) == [[0, 1]]


def test_saying_an_optional_attribute_narrows_and_leaving_it_out_widens():
    with_size = S.Statement(parts=(_said(shape="circle", colour="red", position="centre", size="small"),),
                            scene=None, relations=(), ordered=False)
    with_bg = S.Statement(parts=(_said(shape="circle", colour="red", position="centre"),), scene="stripes",
                          relations=(), ordered=False)
    assert S.relevant_items(task="image", statements=[with_size, with_bg], attributes=GALLERY) == [[0], [1]]


def test_relative_template_reads_the_relation_literally():
    """ "a red circle in the top left, above a blue square": the square's cell is not said."""
    st = S.Statement(parts=(_said(shape="circle", colour="red", position="top-left"), _said(shape="square", colour="blue")),
                     scene=None, relations=((0, "above", 1),), ordered=False)
    items = [
        _image(_obj("top-left", "circle", "red"), _obj("bottom-right", "square", "blue")),  # 0 yes
        _image(_obj("top-left", "circle", "red"), _obj("left", "square", "blue")),          # 1 yes: a row lower
        _image(_obj("top-left", "circle", "red"), _obj("top", "square", "blue")),           # 2 no: same row
        _image(_obj("bottom", "circle", "red"), _obj("top-left", "square", "blue")),        # 3 no: circle not top-left
        _image(_obj("top-left", "circle", "red"), _obj("bottom", "square", "pink")),        # 4 no: colour
    ]
    assert S.relevant_items(task="image", statements=[st], attributes=items) == [[0, 1]]
    # parts are matched in any order: the item lists the square first
    swapped = [_image(_obj("bottom", "square", "blue"), _obj("top-left", "circle", "red"))]
    assert S.relevant_items(task="image", statements=[st], attributes=swapped) == [[0]]


def test_audio_time_order_counts_only_when_the_caption_states_it():
    beep = {"kind": "tone", "pitch": "high", "loudness": "loud", "rhythm": "short"}
    buzz = {"kind": "buzz", "pitch": "low", "loudness": "quiet", "rhythm": "long"}
    items = [{"events": [beep, buzz], "ambience": "hum"}, {"events": [buzz, beep], "ambience": "hum"}]
    parts = (_said(kind="tone", pitch="high"), _said(kind="buzz", pitch="low"))
    then = S.Statement(parts=parts, scene=None, relations=(), ordered=True)  # "a beep, then a buzz"
    listed = S.Statement(parts=parts, scene="hum", relations=(), ordered=False)  # "two sounds over a hum: ..."
    assert S.relevant_items(task="audio", statements=[then, listed], attributes=items) == [[0], [0, 1]]


@pytest.mark.parametrize("task", S.TASKS)
def test_recorded_statements_match_the_text_and_hold_for_the_own_item(task):
    """What a caption records is what it says: every said value has one of its words in the text,
    every optional attribute unsaid is an `omit-` rule; and a caption is always true of its item."""
    tables = {"pitch": ("pitch", "pitch_post"), "motion": ("motion", "motion_ing")}
    scene_name = S.SCENE_FIELD[task][0]
    for i in range(60):
        attrs = S.sample_attributes(task=task, rng=np.random.default_rng([5, i]))
        for cap in S.caption_item(task=task, attributes=attrs, rng=np.random.default_rng([6, i]), n=5):
            text, st = cap.text.lower(), cap.statement
            assert S.consistent(task=task, statement=st, attributes=attrs), cap
            assert len(st.parts) == len(attrs[S.PART_KEY[task]])
            for said in st.parts:
                for field, value in said:
                    assert any(w in text for t in tables.get(field, (field,)) for w in SYN(t, value)), (field, cap)
                for field in set(S.OPTIONAL_ATTRIBUTES[task]) - {scene_name} - dict(said).keys():
                    assert f"form:omit-{field}" in cap.rules
            if st.scene is None:
                assert f"form:omit-{scene_name}" in cap.rules
            else:
                assert any(w in text for w in SYN(scene_name, st.scene))
            assert bool(st.relations) == cap.rules[0].endswith(":relative")


def SYN(table: str, value: str) -> tuple[str, ...]:
    return S.SYNONYMS[table][value]


@pytest.mark.parametrize("task", S.TASKS)
def test_complete_qrels_equal_brute_force_and_keep_the_own_item(task):
    chunks = list(S.generate(task=task, n_train=0, n_test=250, seed=2))
    gallery = _Gallery([i for c in chunks for i in c.item_ids], [a for c in chunks for a in c.attributes],
                       [s for c in chunks for s in c.statements])
    qrels = complete_qrels(task=task, gallery=gallery)
    got = set(zip(qrels["query_id"], qrels["item_id"]))
    brute = {(f"{item}-c{j}", other) for item, sts in zip(gallery.item_ids, gallery.statements)
             for j, st in enumerate(sts) for other, attrs in zip(gallery.item_ids, gallery.attributes)
             if S.consistent(task=task, statement=st, attributes=attrs)}
    assert got == brute
    assert all((f"{item}-c{j}", item) in got for item in gallery.item_ids for j in range(5))
    assert len(got) > 5 * len(gallery.item_ids)  # some queries are true of several items
