"""What to ask about a shapes scene: question types, their phrasings (training and held-out),
and :class:`QuestionMaker`, which draws a conversation whose every answer is a pure function of the
scene. :mod:`vgtrain.data.shapes_vqa` writes them into the VQA demo's shards.
"""

from __future__ import annotations

import random

from vgtrain.data.synthetic import (
    ALL_PAIRS,
    COLORS,
    SHAPES,
    Scene,
    Shape,
    describe_placed,
    grid_cell,
    place_phrase,
)

QUESTION_TYPES: tuple[str, ...] = (
    "color",
    "shape",
    "size",
    "position",
    "count",
    "relation",
    "yes_no",
    "followup",
)
# Asked in the training split only, and only when train_type_weights gives them a weight: an
# answer that names every attribute of the object a question refers to ("Describe the square."
# -> "a small red square at the top left") supervises several tokens per look-up of "the square".
# `inventory` ("Describe the shapes." -> "the square is large and blue on the right, and the
# circle is small and red on the left", the objects in random order) names each object first
# and then reads its attributes: the look-up by name that captions (attributes, then the shape,
# left object first) never train.
# `present` ("Is there a red shape?", "Is there a circle?") asks for one attribute's presence:
# the simplest form of the match yes/no and counts of a colour need.
# `verify` ("Check whether the circle is red." -> "the circle is blue, so no") asks a yes/no
# question whose answer reads the object first and then compares: the comparison is made between
# a word just said and a word of the question, not between two features of the image.
TRAINING_ONLY_TYPES: tuple[str, ...] = ("describe", "inventory", "present", "verify")

# type -> (training phrasings, held-out phrasings). {ref}: the asked-about object; {color},
# {shape}: asked-about attributes; {other}: the other object of a two-shape scene.
PHRASINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "color": (
        ("What color is {ref}?", "What is the color of {ref}?", "Which color does {ref} have?"),
        ("Tell me the color of {ref}.", "Can you name the color of {ref}?"),
    ),
    "shape": (
        ("What shape is {ref}?", "What kind of shape is {ref}?", "Which shape is {ref}?"),
        ("Name the shape of {ref}.", "What form does {ref} have?"),
    ),
    "size": (
        ("Is {ref} small or large?", "What size is {ref}?", "How big is {ref}?"),
        ("Is {ref} large or small?", "Tell me the size of {ref}."),
    ),
    "position": (
        ("Where is {ref}?", "Where is {ref} located?", "In which part of the image is {ref}?"),
        ("Where can {ref} be found?", "What is the position of {ref}?"),
    ),
    "count": (
        ("How many shapes are there?", "How many objects are in the image?"),
        ("Count the shapes.", "What is the number of objects?"),
    ),
    "count_color": (
        ("How many {color} shapes are there?", "How many {color} objects can you see?"),
        ("Count the {color} shapes.", "What is the number of {color} objects?"),
    ),
    "side": (
        ("Is {ref} on the left or on the right?", "On which side is {ref}?"),
        ("Which side of the image is {ref} on?", "Is {ref} at the left or at the right?"),
    ),
    "left_of": (
        ("What is left of {other}?", "Which shape is left of {other}?"),
        ("What is to the left of {other}?", "Name the shape left of {other}."),
    ),
    "right_of": (
        ("What is right of {other}?", "Which shape is right of {other}?"),
        ("What is to the right of {other}?", "Name the shape right of {other}."),
    ),
    "exists": (
        ("Is there a {color} {shape}?", "Is there a {color} {shape} in the image?"),
        ("Do you see a {color} {shape}?", "Does the image contain a {color} {shape}?"),
    ),
    "is_color": (
        ("Is {ref} {color}?", "Is the color of {ref} {color}?"),
        ("Is {ref} colored {color}?", "Would you say {ref} is {color}?"),
    ),
    "describe": (("Describe {ref}.", "What does {ref} look like?"), ("Give a description of {ref}.",)),
    "present_color": (
        ("Is there a {color} shape?", "Is anything {color}?"),
        ("Do you see a {color} shape?",),
    ),
    "present_shape": (
        ("Is there a {shape}?", "Is there a {shape} in the image?"),
        ("Do you see a {shape}?",),
    ),
    "verify_color": (
        ("Check whether {ref} is {color}.", "Look at {ref}: is it {color}?"),
        ("Find out if {ref} is {color}.",),
    ),
    "verify_exists": (
        ("Check whether there is a {color} {shape}.", "Look for a {color} {shape}: is there one?"),
        ("Find out if there is a {color} {shape}.",),
    ),
    "inventory": (("Describe the shapes.", "What shapes are in the image?"), ("List the shapes.",)),
    "followup_color": (("What color is it?", "And what color is it?"), ("Which color does it have?",)),
    "followup_size": (("Is it small or large?", "How big is it?"), ("What size does it have?",)),
    "followup_shape": (("What shape is it?", "And its shape?"), ("Which shape does it have?",)),
    "followup_side": (
        ("Which side is it on?", "Is it on the left or on the right?"),
        ("Where is it, left or right?",),
    ),
    "followup_position": (("Where is it?", "And where is it?"), ("In which part of the image is it?",)),
}


def _side(scene: Scene, obj: Shape) -> str:
    return "left" if obj.cx < scene.image_size / 2 else "right"


def _by_shape(scene: Scene, obj: Shape) -> str:
    """The object named by its shape, disambiguated by side when both shapes are alike."""
    if len(scene.shapes) == 1 or len({s.shape for s in scene.shapes}) == 2:
        return f"the {obj.shape}"
    return f"the {_side(scene, obj)} {obj.shape}"


def _by_color(scene: Scene, obj: Shape) -> str:
    """The object named by its colour (for questions about its shape)."""
    if len(scene.shapes) == 1:
        return "the object"
    if len({s.color for s in scene.shapes}) == 2:
        return f"the {obj.color} object"
    return f"the {_side(scene, obj)} object"


def _inventory(scene: Scene, rng: random.Random) -> str:
    """Each object named first (as the questions name it), then its size, colour and place; two
    objects in random order, so that the first named is found by its name, not by its side."""
    parts = []
    for obj in rng.sample(scene.shapes, len(scene.shapes)):
        where = (
            f"on the {_side(scene, obj)}" if len(scene.shapes) == 2 else place_phrase(obj, scene.image_size)
        )
        parts.append(f"{_by_shape(scene, obj)} is {obj.size} and {obj.color} {where}")
    return ", and ".join(parts)


class QuestionMaker:
    """Draws (question, answer, type) for a scene with one RNG and one phrasing set."""

    def __init__(
        self, rng: random.Random, heldout_phrasing: bool, type_weights: dict[str, float] | None = None
    ) -> None:
        self.rng = rng
        self.pick = 1 if heldout_phrasing else 0
        self.type_weights = type_weights

    def phrase(self, key: str, **fields: str) -> str:
        return self.rng.choice(PHRASINGS[key][self.pick]).format(**fields)

    def types(self, scene: Scene) -> list[str]:
        kinds = ["color", "shape", "size", "count", "yes_no"]
        kinds.append("position" if len(scene.shapes) == 1 else "relation")
        if self.type_weights:
            kinds += [kind for kind in TRAINING_ONLY_TYPES if self.type_weights.get(kind, 0) > 0]
        return kinds

    def question(self, scene: Scene, kind: str) -> tuple[str, str, Shape | None]:
        """(question, answer, the object asked about or None)."""
        rng, shapes = self.rng, scene.shapes
        obj = rng.choice(shapes)
        if kind == "color":
            return self.phrase("color", ref=_by_shape(scene, obj)), obj.color, obj
        if kind == "shape":
            return self.phrase("shape", ref=_by_color(scene, obj)), obj.shape, obj
        if kind == "size":
            return self.phrase("size", ref=_by_shape(scene, obj)), obj.size, obj
        if kind == "position":
            return self.phrase("position", ref=f"the {obj.shape}"), grid_cell(obj, scene.image_size), obj
        if kind == "count":
            if rng.random() < 0.4:
                return self.phrase("count"), str(len(shapes)), None
            present = rng.random() < 0.7
            color = (
                obj.color
                if present
                else rng.choice([c for c in COLORS if c not in {s.color for s in shapes}])
            )
            return self.phrase("count_color", color=color), str(sum(s.color == color for s in shapes)), None
        if kind == "relation":
            left, right = sorted(shapes, key=lambda s: s.cx)
            form = rng.choice(("side", "left_of", "right_of"))
            if form == "side":
                return self.phrase("side", ref=_by_shape(scene, obj)), _side(scene, obj), obj
            if form == "left_of":
                return (
                    self.phrase("left_of", other=_by_shape(scene, right)),
                    f"{left.color} {left.shape}",
                    left,
                )
            return (
                self.phrase("right_of", other=_by_shape(scene, left)),
                f"{right.color} {right.shape}",
                right,
            )
        if kind == "yes_no":
            if rng.random() < 0.5:
                truth = rng.random() < 0.5
                color = _asked_color(rng, obj, truth)
                return self.phrase("is_color", ref=_by_shape(scene, obj), color=color), _yes(truth), obj
            truth = rng.random() < 0.5
            color, shape = _asked_pair(rng, scene, obj, truth)
            return self.phrase("exists", color=color, shape=shape), _yes(truth), None
        if kind == "describe":
            ref = _by_shape(scene, obj) if rng.random() < 0.5 else _by_color(scene, obj)
            return self.phrase("describe", ref=ref), describe_placed(obj, scene.image_size), obj
        if kind == "present":
            truth = rng.random() < 0.5
            if rng.random() < 0.5:
                colors = {s.color for s in shapes}
                color = obj.color if truth else rng.choice([c for c in COLORS if c not in colors])
                return self.phrase("present_color", color=color), _yes(truth), None
            forms = {s.shape for s in shapes}
            shape = obj.shape if truth else rng.choice([f for f in SHAPES if f not in forms])
            return self.phrase("present_shape", shape=shape), _yes(truth), None
        if kind == "inventory":
            return self.phrase("inventory"), _inventory(scene, rng), None
        if kind == "verify":
            truth = rng.random() < 0.5
            if rng.random() < 0.5:
                ref = _by_shape(scene, obj)
                color = _asked_color(rng, obj, truth)
                answer = f"{ref} is {obj.color}, so {_yes(truth)}"
                return self.phrase("verify_color", ref=ref, color=color), answer, obj
            color, shape = _asked_pair(rng, scene, obj, truth)
            alike = [s for s in shapes if s.shape == shape]
            found = (
                " and ".join(f"{_by_shape(scene, s)} is {s.color}" for s in alike) or f"there is no {shape}"
            )
            return self.phrase("verify_exists", color=color, shape=shape), f"{found}, so {_yes(truth)}", None
        raise ValueError(f"unknown question type {kind!r}")

    def followup(self, scene: Scene, obj: Shape, asked: str) -> tuple[str, str]:
        """A second turn about "it" (the first turn's object), asking another attribute."""
        choices = [k for k in ("color", "size", "shape") if k != asked]
        choices.append("position" if len(scene.shapes) == 1 else "side")
        kind = self.rng.choice(choices)
        answer = {
            "color": obj.color,
            "size": obj.size,
            "shape": obj.shape,
            "position": grid_cell(obj, scene.image_size),
            "side": _side(scene, obj),
        }[kind]
        return self.phrase(f"followup_{kind}"), answer

    def conversation(self, scene: Scene, dialogue: bool) -> list[dict[str, str]]:
        kinds = self.types(scene)
        if dialogue:
            first = self.rng.choice(["color", "size", "shape"])
            question, answer, obj = self.question(scene, first)
            assert obj is not None
            follow_q, follow_a = self.followup(scene, obj, first)
            return [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer, "type": first},
                {"role": "user", "content": follow_q},
                {"role": "assistant", "content": follow_a, "type": "followup"},
            ]
        if self.type_weights is None:
            kind = self.rng.choice(kinds)
        else:
            kind = self.rng.choices(kinds, weights=[self.type_weights.get(k, 1.0) for k in kinds])[0]
        question, answer, _ = self.question(scene, kind)
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer, "type": kind}]


def _asked_color(rng: random.Random, obj: Shape, truth: bool) -> str:
    """The colour a yes/no question asks ``obj`` about: its own when the answer is yes."""
    return obj.color if truth else rng.choice([c for c in COLORS if c != obj.color])


def _asked_pair(rng: random.Random, scene: Scene, obj: Shape, truth: bool) -> tuple[str, str]:
    """The (colour, shape) a question asks the presence of: ``obj``'s, or one absent from the scene."""
    present = {(s.color, s.shape) for s in scene.shapes}
    return (obj.color, obj.shape) if truth else rng.choice(sorted(ALL_PAIRS - present))


def _yes(truth: bool) -> str:
    return "yes" if truth else "no"
