"""Caption metrics against the reference COCO caption evaluation (pycocoevalcap)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from vgtrain.metrics import bleu, caption_metrics, cider_d, clip_scores, rouge_l, tokenize
from vgtrain.metrics.java import java_problem

# The tests against the reference need it; the hand-computed values do not.
needs_reference = pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None,
    reason="pycocoevalcap is the reference (pip install vgtrain[dev])",
)

# Candidates and references with ties (two references equally close in length, identical
# candidates), repeated words (clipping), punctuation, casing, contractions, brackets, numbers,
# and empty or punctuation-only candidates.
PREDICTIONS = {
    "1": "A man riding a wave on top of a surfboard.",
    "2": "",
    "3": "the the the the the the",
    "4": "A DOG, a Dog; and a dog!",
    "5": "a cat sitting on a laptop keyboard",
    "6": "two dogs playing in the snow..",
    "7": "a kitchen with a stove (and an oven)",
    "8": "It's a man's bike, isn't it?",
    "9": "a cat sitting on a laptop keyboard",
    "10": "...",
    "11": "a plate with 3.5 sandwiches, 1,000 fries & a fork",
    "12": 'a red and white sign that says "stop"',
}
REFERENCES = {
    "1": [
        "A surfer riding a wave on a surfboard.",
        "A man on a surfboard riding a big wave.",
        "a man surfing on a wave",
    ],
    "2": ["A bowl of fruit on a table.", "Apples and oranges in a bowl."],
    "3": ["the cat is on the mat", "there is a cat on the mat"],
    "4": ["A dog and a cat.", "Two dogs and a cat playing."],
    "5": ["A cat laying on a laptop keyboard.", "a cat sits on the keyboard of a laptop", "cat, laptop"],
    "6": ["Two dogs play in the snow.", "Dogs playing in snow", "two puppies running through the snow"],
    "7": ["A kitchen with a stove, an oven and a sink.", "a small kitchen (with a stove)"],
    "8": ["A man's bike leaning on a wall.", "It is a bicycle."],
    "9": ["A cat laying on a laptop keyboard.", "a cat sits on the keyboard of a laptop"],
    "10": ["An empty street at night.", "a street with no cars"],
    "11": ["A plate of sandwiches and fries.", "sandwiches & fries on a plate with a fork"],
    "12": ['A red "STOP" sign on a pole.', "a stop sign", "A red and white stop sign."],
}


def reference_scores(candidates: dict, references: dict) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    blue, _ = Bleu(4).compute_score(references, candidates, verbose=0)
    return {
        **{f"bleu_{k + 1}": value for k, value in enumerate(blue)},
        "rouge_l": Rouge().compute_score(references, candidates)[0],
        "cider": Cider().compute_score(references, candidates)[0],
    }


@needs_reference
def test_bleu_rouge_cider_equal_reference_on_tokenized_text() -> None:
    """The scorers alone (no Java needed): same tokenized input -> same values to 1e-6."""
    candidates = tokenize({k: [v] for k, v in PREDICTIONS.items()})
    references = tokenize(REFERENCES)
    expected = reference_scores(candidates, references)
    corpus, _ = bleu(candidates, references)
    ours = {
        **{f"bleu_{k + 1}": value for k, value in enumerate(corpus)},
        "rouge_l": rouge_l(candidates, references)[0],
        "cider": cider_d(candidates, references)[0],
    }
    assert ours == pytest.approx(expected, abs=1e-6)
    assert 0 < ours["bleu_4"] < ours["bleu_1"] < 1 and ours["cider"] > 0


@needs_reference
def test_per_image_scores_equal_reference() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    candidates = tokenize({k: [v] for k, v in PREDICTIONS.items()})
    references = tokenize(REFERENCES)
    expected_bleu = Bleu(4).compute_score(references, candidates, verbose=0)[1]
    for ours, theirs in zip(bleu(candidates, references)[1], expected_bleu, strict=True):
        assert ours == pytest.approx(list(theirs), abs=1e-6)
    assert rouge_l(candidates, references)[1] == pytest.approx(
        list(Rouge().compute_score(references, candidates)[1]), abs=1e-6
    )
    assert cider_d(candidates, references)[1] == pytest.approx(
        list(Cider().compute_score(references, candidates)[1]), abs=1e-6
    )


# Two images, one reference each, small enough to score by hand (the derivations are below).
HAND_CANDIDATES = {"A": ["a dog runs on the grass"], "B": ["a cat sleeps"]}
HAND_REFERENCES = {"A": ["a dog runs on grass"], "B": ["a cat sleeps on a bed"]}


def hand_values() -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of HAND_CANDIDATES worked out by hand.

    BLEU (corpus-level, clipped n-gram precision summed over both images; brevity penalty from
    the closest reference length): 1-grams 5/6 + 3/3 = 8/9, 2-grams 3/5 + 2/2 = 5/7, 3-grams
    2/4 + 1/1 = 3/5, 4-grams 1/3 + 0/0 = 1/3; candidate length 9 < reference length 11, so
    BP = exp(1 - 11/9).
    ROUGE-L (beta = 1.2, mean over images): A has LCS 5 of 6 / 5 tokens, B LCS 3 of 3 / 6.
    CIDEr-D (sigma = 6, x10, idf over the 2 images' references): "a" and "on" occur in both
    references and weigh 0, every other n-gram weighs log 2 (which cancels in the cosines).
    A: cosines 3/(2*sqrt3), 3/(2*sqrt5), 2/(2*sqrt3), 1/sqrt6 for n = 1..4; 5 vs 4 bigrams, so
    the length penalty is exp(-1/72). B: 2/(sqrt2*sqrt3), 2/sqrt10, 1/2, 0 (no 4-gram);
    2 vs 5 bigrams: exp(-9/72).
    """
    bp = math.exp(1 - 11 / 9)
    precisions = [8 / 9, 5 / 7, 3 / 5, 1 / 3]
    values = {f"bleu_{n}": bp * math.prod(precisions[:n]) ** (1 / n) for n in range(1, 5)}

    def f_beta(precision: float, recall: float, beta: float = 1.2) -> float:
        return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)

    values["rouge_l"] = (f_beta(5 / 6, 5 / 5) + f_beta(3 / 3, 3 / 6)) / 2
    r2, r3, r5, r6, r10 = (math.sqrt(x) for x in (2, 3, 5, 6, 10))
    cider_a = 10 * math.exp(-1 / 72) * (3 / (2 * r3) + 3 / (2 * r5) + 2 / (2 * r3) + 1 / r6) / 4
    cider_b = 10 * math.exp(-9 / 72) * (2 / (r2 * r3) + 2 / r10 + 1 / 2 + 0) / 4
    values["cider_a"], values["cider_b"] = cider_a, cider_b
    values["cider"] = (cider_a + cider_b) / 2
    return values


def test_scores_equal_hand_computed_values() -> None:
    expected = hand_values()
    # Rounded figures, for a reader checking the arithmetic above.
    assert [round(expected[f"bleu_{n}"], 4) for n in range(1, 5)] == [0.7118, 0.6380, 0.5805, 0.4780]
    assert round(expected["rouge_l"], 4) == 0.7766
    assert (round(expected["cider_a"], 4), round(expected["cider_b"], 4)) == (6.2191, 4.2999)

    corpus, _ = bleu(HAND_CANDIDATES, HAND_REFERENCES)
    assert corpus == pytest.approx([expected[f"bleu_{n}"] for n in range(1, 5)], abs=1e-6)
    assert rouge_l(HAND_CANDIDATES, HAND_REFERENCES)[0] == pytest.approx(expected["rouge_l"], abs=1e-6)
    cider, per_image = cider_d(HAND_CANDIDATES, HAND_REFERENCES)
    assert cider == pytest.approx(expected["cider"], abs=1e-6)
    assert per_image == pytest.approx([expected["cider_a"], expected["cider_b"]], abs=1e-6)
    # Raw text through the whole pipeline (tokenizer included): casing and punctuation do not count.
    report = caption_metrics(
        {"A": "A dog runs on the grass.", "B": "A cat sleeps!"},
        {"A": ["A dog runs on grass."], "B": ["A cat sleeps on a bed."]},
        metrics=["bleu", "rouge_l", "cider"],
    )
    assert {k: report.values[k] for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider")} == (
        pytest.approx({k: v for k, v in expected.items() if not k.startswith("cider_")}, abs=1e-6)
    )


@needs_reference
def test_hand_computed_values_equal_reference() -> None:
    expected = hand_values()
    theirs = reference_scores(HAND_CANDIDATES, HAND_REFERENCES)
    assert theirs == pytest.approx({k: v for k, v in expected.items() if k in theirs}, abs=1e-6)


def test_tokenizing_twice_changes_nothing() -> None:
    once = tokenize(REFERENCES)
    assert tokenize(once) == once
    assert once["8"] == ["a man 's bike leaning on a wall", "it is a bicycle"]


def test_empty_and_perfect_candidates() -> None:
    references = {"a": ["a dog runs"], "b": ["a cat sleeps"], "c": ["a bird flies"]}
    perfect = caption_metrics(
        {"a": "A dog runs.", "b": "a cat sleeps", "c": "A bird flies!"},
        references,
        metrics=["bleu", "rouge_l"],
    )
    assert perfect.values["bleu_1"] == pytest.approx(1.0)
    assert perfect.values["rouge_l"] == pytest.approx(1.0)
    empty = caption_metrics({"a": "", "b": "", "c": ""}, references, metrics=["bleu", "rouge_l", "cider"])
    assert empty.values["cider"] == 0 and empty.values["rouge_l"] == 0 and empty.values["bleu_4"] < 1e-9


@needs_reference
@pytest.mark.skipif(
    java_problem() is not None, reason=f"no Java for the reference tokenizer: {java_problem()}"
)
def test_full_pipeline_equals_reference_with_its_java_tokenizer() -> None:
    """Raw text through our tokenizer and scorers == raw text through pycocoevalcap's PTBTokenizer
    (Stanford CoreNLP, Java) and its scorers. The empty candidate is not last: the reference
    tokenizer drops a trailing empty line and would lose that image."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    candidates = tokenizer.tokenize({k: [{"caption": v}] for k, v in PREDICTIONS.items()})
    references = tokenizer.tokenize({k: [{"caption": r} for r in refs] for k, refs in REFERENCES.items()})
    assert candidates == tokenize({k: [v] for k, v in PREDICTIONS.items()})
    assert references == tokenize(REFERENCES)
    expected = reference_scores(candidates, references)
    report = caption_metrics(PREDICTIONS, REFERENCES, metrics=["bleu", "rouge_l", "cider"])
    assert {k: report.values[k] for k in expected} == pytest.approx(expected, abs=1e-6)


@needs_reference
@pytest.mark.skipif(java_problem() is not None, reason=f"METEOR needs Java: {java_problem()}")
def test_meteor_equals_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from pycocoevalcap.meteor.meteor import Meteor

    candidates = tokenize({k: [v] for k, v in PREDICTIONS.items() if v.strip(".")})
    references = tokenize({k: REFERENCES[k] for k in candidates})
    scorer = Meteor()
    expected, _ = scorer.compute_score(references, candidates)
    # The same METEOR process serves vgtrain's call too: one JVM start-up (~15 s) instead of two.
    monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", lambda: scorer)
    report = caption_metrics(
        {k: PREDICTIONS[k] for k in candidates}, {k: REFERENCES[k] for k in candidates}, metrics=["meteor"]
    )
    assert report.skipped == {}
    assert report.values["meteor"] == pytest.approx(expected, abs=1e-6)
    assert 0 < report.values["meteor"] < 1


def test_spice_is_computed_or_skipped_with_a_reason() -> None:
    """SPICE runs where Java and the CoreNLP jars are present; otherwise it is None with a reason
    that says what is missing, and nothing is downloaded (the network guard would fail the test)."""
    from vgtrain.metrics.java import spice

    candidates = tokenize({"1": [PREDICTIONS["1"]]})
    references = tokenize({"1": REFERENCES["1"]})
    value, reason = spice(candidates, references)
    if value is None:
        assert reason and ("CoreNLP" in reason or "Java" in reason or "java" in reason)
        report = caption_metrics({"1": PREDICTIONS["1"]}, {"1": REFERENCES["1"]}, metrics=["spice"])
        assert report.values["spice"] is None and report.skipped["spice"] == reason
    else:
        from pycocoevalcap.spice.spice import Spice

        assert value == pytest.approx(Spice().compute_score(references, candidates)[0], abs=1e-6)


def test_metric_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="different images"):
        bleu({"a": ["x"]}, {"b": ["x"]})
    with pytest.raises(ValueError, match="unknown caption metrics"):
        caption_metrics({"a": "x"}, {"a": ["x"]}, metrics=["blue"])


def test_clipscore_follows_its_definition() -> None:
    """CLIP-S = w * max(cos, 0) with w = 2.5; RefCLIP-S is the harmonic mean with max_r max(cos, 0)."""
    torch.manual_seed(0)
    image = torch.randn(4, 16)
    same, _ = clip_scores(image, image.clone())
    assert same == pytest.approx(torch.full((4,), 2.5), abs=1e-6)
    opposite, _ = clip_scores(image, -image)
    assert torch.equal(opposite, torch.zeros(4))
    # A 60-degree angle: cos = 0.5 -> 1.25, whatever the vector lengths.
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 3.0 * math.sqrt(3.0)]])
    score, ref = clip_scores(a, b, [torch.tensor([[2.0, 2.0 * math.sqrt(3.0)], [0.0, -1.0]])])
    assert score.item() == pytest.approx(1.25, abs=1e-6)
    assert ref.item() == pytest.approx(2 * 1.25 * 1.0 / (1.25 + 1.0), abs=1e-6)  # best reference: cos = 1
    _, none = clip_scores(a, -a, [-a])
    assert none.item() == 0.0
