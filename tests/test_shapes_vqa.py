"""The VQA demo data: answers follow from the scene, follow-ups need the history, phrasings split."""

import json
import re
import tarfile

import pytest
import webdataset as wds

from vgtrain.data.shapes_questions import PHRASINGS, QUESTION_TYPES
from vgtrain.data.shapes_vqa import _scenes, write_shapes_vqa_dataset
from vgtrain.data.synthetic import COLORS, SHAPES, SIZES

COLOR = "(?:" + "|".join(COLORS) + ")"
SHAPE = "(?:" + "|".join(SHAPES) + ")"
REF = f"the (?:(?:left|right|{COLOR}) )?(?:{SHAPE}|object|shape)"
FIELDS = {"ref": REF, "other": REF, "color": COLOR, "shape": SHAPE}


def _pattern(template):
    """The questions a template can produce (each field: the words it can be filled with)."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(FIELDS[part] if i % 2 else re.escape(part) for i, part in enumerate(parts))
    return re.compile(f"^{regex}$")


TRAIN = [_pattern(t) for train, _ in PHRASINGS.values() for t in train]
HELDOUT = [_pattern(t) for _, heldout in PHRASINGS.values() for t in heldout]


def test_answers_follow_from_the_scene_and_phrasings_are_split():
    seen = set()
    for split, patterns, others in (("train", TRAIN, HELDOUT), ("phrasing", HELDOUT, TRAIN)):
        for scene, conversations in _scenes(split, 300, 64, 0, 4, 0.3):
            colors = [s.color for s in scene.shapes]
            for conversation in conversations:
                for question, answer in zip(conversation[::2], conversation[1::2], strict=True):
                    text, kind = question["content"], answer["type"]
                    seen.add(kind)
                    assert any(p.match(text) for p in patterns) and not any(p.match(text) for p in others)
                    if kind == "color":
                        assert answer["content"] in colors
                    elif kind == "shape":
                        assert answer["content"] in {s.shape for s in scene.shapes} <= set(SHAPES)
                    elif kind == "size":
                        assert answer["content"] in SIZES
                    elif kind == "count" and "shapes are there" in text and len(text.split()) == 5:
                        assert answer["content"] == str(len(scene.shapes))
                    elif kind == "count":
                        color = next((c for c in COLORS if c in text), None)
                        if color:
                            assert answer["content"] == str(colors.count(color))
                    elif kind == "yes_no":
                        assert answer["content"] in ("yes", "no")
                    elif kind == "followup":
                        assert " it" in text  # only the first turn says which object
    assert seen == set(QUESTION_TYPES)


def test_training_type_weights_skew_training_questions_only(tmp_path):
    """data.synthetic.train_type_weights: the training split asks the weighted types more often;
    val and phrasing (scored) are the very same shards as without weights; unknown types are
    refused by name."""
    weights = {"yes_no": 4.0, "size": 0.0, "describe": 2.0}

    def write(folder, type_weights=None):
        return write_shapes_vqa_dataset(
            tmp_path / folder,
            num_train=150,
            num_val=20,
            num_phrasing=20,
            samples_per_shard=200,
            conversations_per_image=4,
            dialogue_share=0.0,
            train_type_weights=type_weights,
            progress=False,
        )

    def types(folder, split):
        texts = [
            json.loads(sample["json"])["conversations"]
            for sample in wds.WebDataset(str(tmp_path / folder / f"{split}-000000.tar"), shardshuffle=False)
        ]
        return [c[1]["type"] for conversations in texts for c in conversations]

    write("plain"), write("skewed", weights)
    plain, skewed = types("plain", "train"), types("skewed", "train")
    assert skewed.count("size") == 0 < plain.count("size")
    assert skewed.count("yes_no") > 2 * plain.count("yes_no")
    assert skewed.count("describe") > 0 == plain.count("describe")  # training-only, when weighted
    for split in ("val", "phrasing"):
        assert types("plain", split) == types("skewed", split)
        name = f"{split}-000000.tar"
        assert _members(tmp_path / "plain" / name) == _members(tmp_path / "skewed" / name)
    with pytest.raises(ValueError, match="unknown type.*colour"):
        write("bad", {"colour": 2.0})


def test_two_shape_share_skews_training_scenes_only(tmp_path):
    """data.synthetic.train_two_shape_share: that share of training scenes has two shapes; val
    and phrasing are the very same shards as without it; a share outside [0, 1] is refused."""

    def write(folder, share=None):
        return write_shapes_vqa_dataset(
            tmp_path / folder,
            num_train=400,
            num_val=20,
            num_phrasing=20,
            samples_per_shard=500,
            conversations_per_image=1,
            train_two_shape_share=share,
            progress=False,
        )

    def two_shape_share(folder):
        scenes = [
            json.loads(sample["json"])["shapes"]
            for sample in wds.WebDataset(str(tmp_path / folder / "train-000000.tar"), shardshuffle=False)
        ]
        return sum(len(shapes) == 2 for shapes in scenes) / len(scenes)

    write("plain"), write("skewed", 0.9), write("one", 0.0)
    assert 0.4 < two_shape_share("plain") < 0.6
    assert 0.85 < two_shape_share("skewed") < 0.95
    assert two_shape_share("one") == 0.0
    for split in ("val", "phrasing"):
        name = f"{split}-000000.tar"
        assert _members(tmp_path / "plain" / name) == _members(tmp_path / "skewed" / name)
    with pytest.raises(ValueError, match="train_two_shape_share"):
        write("bad", 1.5)


def test_describe_answers_name_the_referred_object_and_its_place():
    """The training-only "describe" type: the answer is the object's size, colour, shape and
    place, the object named by its shape or by its colour as the other questions name it."""
    asked = 0
    for scene, conversations in _scenes("train", 200, 64, 0, 4, 0.0, {"describe": 50.0}):
        for question, answer in (c for c in conversations if c[1]["type"] == "describe"):
            asked += 1
            match = re.fullmatch(
                f"a ({'|'.join(SIZES)}) ({COLOR}) ({SHAPE}) (?:at the \\w+ \\w+|in the center)",
                answer["content"],
            )
            assert match, answer["content"]
            size, color, shape = match.groups()
            referred = [s for s in scene.shapes if (s.size, s.color, s.shape) == (size, color, shape)]
            assert referred and any(p.match(question["content"]) for p in TRAIN)
            named = question["content"]
            assert shape in named or color in named or "object" in named
    assert asked > 500


def test_inventory_names_each_object_then_reads_it_in_random_order():
    """The training-only "inventory" type: every object, named as the questions name it, then its
    size, colour and place; in two-shape scenes the left object comes first about half the time
    (so the first named object must be found by its name, not by its side)."""
    left_first = two_shape = 0
    for scene, conversations in _scenes("train", 300, 64, 0, 4, 0.0, {"inventory": 50.0}):
        for _, answer in (c for c in conversations if c[1]["type"] == "inventory"):
            parts = answer["content"].split(", and ")
            assert len(parts) == len(scene.shapes)
            described = []
            for part in parts:
                match = re.fullmatch(
                    f"the (?:(left|right) )?({SHAPE}) is ({'|'.join(SIZES)}) and ({COLOR}) "
                    "(?:on the (left|right)|at the \\w+ \\w+|in the center)",
                    part,
                )
                assert match, part
                named_side, shape, size, color, side = match.groups()
                assert named_side in (None, side)
                (obj,) = [
                    s
                    for s in scene.shapes
                    if (s.shape, s.size, s.color) == (shape, size, color)
                    and side in (None, "left" if s.cx < 32 else "right")
                ]
                described.append(obj)
            assert sorted(map(id, described)) == sorted(map(id, scene.shapes))
            if len(parts) == 2:
                two_shape += 1
                left_first += described[0].cx < described[1].cx
    assert two_shape > 200 and 0.35 < left_first / two_shape < 0.65


def test_present_answers_whether_one_attribute_is_in_the_scene():
    """The training-only "present" type: "Is there a red shape?" / "Is there a circle?" is
    answered yes exactly when some object has that colour / shape; both answers are common."""
    answers = []
    for scene, conversations in _scenes("train", 300, 64, 0, 4, 0.0, {"present": 50.0}):
        for question, answer in (c for c in conversations if c[1]["type"] == "present"):
            text = question["content"]
            (word,) = [w for w in re.findall(r"\w+", text) if w in COLORS or w in SHAPES]
            present = any(word in (s.color, s.shape) for s in scene.shapes)
            assert answer["content"] == ("yes" if present else "no"), text
            answers.append(answer["content"])
    assert len(answers) > 500 and 0.4 < answers.count("yes") / len(answers) < 0.6


def test_verify_answers_read_the_object_then_compare():
    """The training-only "verify" type: "Check whether the circle is red." -> "the circle is blue,
    so no": the objects read are the scene's, and the verdict is yes exactly when the asked colour
    (and shape) is there; both verdicts are common."""
    verdicts = []
    for scene, conversations in _scenes("train", 300, 64, 0, 4, 0.0, {"verify": 50.0}):
        for question, answer in (c for c in conversations if c[1]["type"] == "verify"):
            text, reply = question["content"], answer["content"]
            found, verdict = reply.rsplit(", so ", 1)
            asked_color = next(w for w in re.findall(r"\w+", text) if w in COLORS)
            asked_shape = next((w for w in re.findall(r"\w+", text) if w in SHAPES), None)
            readings = re.findall(f"the (?:(left|right) )?({SHAPE}) is ({COLOR})", found)
            for side, shape, color in readings:
                assert any(
                    (s.shape, s.color) == (shape, color) and side in ("", "left" if s.cx < 32 else "right")
                    for s in scene.shapes
                ), reply
            if not readings:
                assert found == f"there is no {asked_shape}"
                assert asked_shape not in {s.shape for s in scene.shapes}
            assert verdict == ("yes" if any(color == asked_color for _, _, color in readings) else "no"), (
                reply
            )
            if text.startswith(("Check whether there", "Look for")):
                present = any((s.color, s.shape) == (asked_color, asked_shape) for s in scene.shapes)
                assert verdict == ("yes" if present else "no"), reply
            verdicts.append(verdict)
    assert len(verdicts) > 500 and 0.4 < verdicts.count("yes") / len(verdicts) < 0.6


def _members(shard):
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_corpus_leaves_out_training_only_phrasings(tmp_path):
    """The tokenizer corpus holds every held-out phrasing of the asked types and none of a
    training-only type's ("Do you see a {shape}?" of `present`): adding such a type must not change
    the tokenizer, so every run, of configurations that never ask it."""
    from vgtrain.data.shapes_questions import TRAINING_ONLY_TYPES
    from vgtrain.data.shapes_vqa import write_corpus

    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, image_size=64, seed=0, dialogue_share=0.3)
    lines = set(corpus.read_text().splitlines())
    for key, (_, heldout) in PHRASINGS.items():
        training_only = any(key == kind or key.startswith(f"{kind}_") for kind in TRAINING_ONLY_TYPES)
        for phrasing in heldout:
            assert (phrasing in lines) != training_only, (key, phrasing)
    assert "Do you see a {shape}?" not in lines and "Find out if {ref} is {color}." not in lines


def test_regions_box_each_drawn_shape_with_its_colour_and_kind():
    """Each training scene's `regions` (for model.grounding): one per shape, its words the shape's
    size, colour and kind, its box holding every pixel drawn in that colour on that side."""
    import numpy as np

    from vgtrain.data.shapes_vqa import regions
    from vgtrain.data.synthetic import COLORS as RGB
    from vgtrain.data.synthetic import render

    for scene, _ in _scenes("train", 40, 64, 0, 1, 0.0):
        boxes = regions(scene)
        assert [b["words"] for b in boxes] == [[s.size, s.color, s.shape] for s in scene.shapes]
        pixels = np.asarray(render(scene, 64)).astype(int)
        for shape, region in zip(scene.shapes, boxes, strict=True):
            x0, y0, x1, y1 = (v * 64 for v in region["box"])
            match = (np.abs(pixels - np.array(RGB[shape.color])).sum(-1) < 30).nonzero()
            ys, xs = match
            mine = (xs < 32) == (shape.cx < 32) if len(scene.shapes) == 2 else np.ones_like(xs, bool)
            assert mine.any()
            assert x0 - 1 <= xs[mine].min() and xs[mine].max() <= x1 + 1
            assert y0 - 1 <= ys[mine].min() and ys[mine].max() <= y1 + 1
