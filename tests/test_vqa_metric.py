"""VQA accuracy and the official answer normalisation on tricky answers."""

import pytest

from vgtrain.metrics.vqa import answer_score, exact_match, normalize_answer, vqa_accuracy


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("yes.", "yes"),
        ("two", "2"),
        ("Two dogs", "2 dogs"),
        ("none", "0"),
        ("a dog", "dog"),
        ("The red one", "red 1"),
        ("an apple", "apple"),
        ("dont", "don\u2019t"),  # the official table restores the apostrophe (typographic)
        ("isnt", "isn\u2019t"),
        ("cant", "can't"),
        ("don't", "don t"),  # "'" is punctuation; without a space next to it, it becomes a space
        ("2.5", "2.5"),  # a period before a digit stays
        ("10,000", "10000"),  # digit-comma-digit: punctuation is removed, not spaced
        ("black/white", "black white"),
        ("black / white", "black white"),
        ("  left\tside\n", "left side"),
        ("what?", "what"),
        ("hello!", "hello!"),  # "!" is not in the official list
    ],
)
def test_normalization_matches_the_official_rules(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_accuracy_is_the_mean_over_leave_one_out_subsets():
    refs = ["2"] * 3 + ["3"] * 7
    # A reference "2" left out: 2 others match -> 2/3; a "3" left out: 3 match -> 1.
    assert vqa_accuracy("two", refs) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert vqa_accuracy("fish", ["dog"] * 9 + ["cat"]) == 0.0
    # One matching reference: 9 subsets hold it (1/3 each), the one without it gives 0.
    assert vqa_accuracy("cat", ["dog"] * 9 + ["cat"]) == pytest.approx(9 / 3 / 10)
    assert vqa_accuracy("cat", ["cat", "cat"] + ["dog"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)


def test_official_mode_normalises_references_only_as_the_official_script_does():
    # VQAv2's references are pre-normalised: both modes agree on them.
    for prediction, refs in [
        ("Two", ["2"] * 10),
        ("yes.", ["yes"] * 10),
        ("A dog", ["dog"] * 6 + ["cat"] * 4),
    ]:
        assert vqa_accuracy(prediction, refs, official=True) == vqa_accuracy(prediction, refs)
    # References left as people typed them: the official script never maps their number words
    # or articles, and strips their punctuation only when the ten disagree.
    assert vqa_accuracy("2", ["two"] * 10, official=True) == 0.0
    assert vqa_accuracy("2", ["two"] * 10) == 1.0
    assert vqa_accuracy("yes", ["yes."] * 10, official=True) == 0.0
    # Disagreeing references: punctuation stripped, so "yes." counts as "yes".
    assert vqa_accuracy("yes", ["yes."] * 2 + ["no"] * 8, official=True) == pytest.approx(
        (2 / 3 + 8 * 2 / 3) / 10
    )


def test_exact_match_for_single_answer_data():
    assert exact_match("Two.", ["2"]) == 1.0
    assert exact_match("the red circle", ["red circle"]) == 1.0
    assert exact_match("red", ["red circle"]) == 0.0
    assert answer_score("yes", ["yes"]) == 1.0  # one reference: exact match, not 0 from the formula
    assert vqa_accuracy("yes", ["yes"]) == 0.0
    assert answer_score("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(
        vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8)
    )
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("x", [])
