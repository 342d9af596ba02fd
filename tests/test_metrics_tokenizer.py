"""The pure-Python PTB tokenizer against the reference's Java tokenizer (Stanford CoreNLP 3.4.1)."""

from __future__ import annotations

import pytest

from vgtrain.metrics.java import java_problem
from vgtrain.metrics.tokenizer import tokenize_caption

# Caption text as people and models write it: casing, punctuation runs, clitics, quotes of every
# kind, brackets, numbers, abbreviations, hyphens, ampersands, unicode dashes and ellipses.
CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "A man standing next to a red fire hydrant .",
    "two dogs playing in the snow..",
    "a kitchen with a stove , oven , and refrigerator",
    'a "stop" sign',
    'A dog\'s bone (and a "red" ball)!',
    "He can't, won't, doesn't; I'm you're we'll they'd.",
    "The colour of the theatre, a grey cat.",
    "Cannot gonna wanna gotta lemme gimme.",
    "3.5 people, 1,000 dogs, $5 and 10% at 5:30 p.m.",
    "Mr. Smith and Dr. Who vs. U.S.A. etc.",
    "black-and-white photo -- with... dashes - and [brackets] {braces}",
    "",
    "   ",
    "A MAN  Riding   a BIKE",
    "e-mail user@example.com & AT&T a&b",
    "naïve café — “quoted” ‘single’ … ½",
    "'tis the season 'cause",
    "it's 90's style, the 1990s, o'clock",
    "A cat sitting on a laptop keyboard..",
    "people??? wow!!! ok?!",
    'a sign that says "stop".',
    "plan a. then j. smith went to st. louis with dr. smith and mt. fuji.",
    "No. 5 and no. 5 and Inc. and inc. and Ltd. co. corp. ave. jr. sr. vs. etc. e.g. i.e. approx. dept. st.",
    "A dog at the st.",
    "It is 5 p.m.",
    "a dog. a cat.a bird",
    "the dogs' bones and james' car",
    "they're we've she'd i'd've y'all ma'am o'neill don't",
    "a 2-year-old boy; the 1st place, 2nd, 3rd & 4th.",
    "a b&w photo, a 4x4 truck, 50/50 chance, 100km/h",
    "a \"quoted phrase\" and 'single quoted' and `back` and ''double''",
    "(a)(b) [c] {d} a/b a\\b a|b a~b a^b a*b a+b a=b a_b #hashtag @user",
    "tokyo's café naïve coöperate résumé über straße",
    "email: john.doe@gmail.com and www.google.com and google.com",
    "U.S. army, U.K., the u.s.",
    "the dog is 'happy'. the cat isn't.",
    "wouldn't couldn't shouldn't mustn't needn't ain't aren't isn't wasn't weren't hasn't haven't hadn't",
    "a dog’s ball and the cat’s toy, it’s “great”.",
    "a man's bike's wheel",
    "TWO PEOPLE ON A BEACH!",
    "the no. 5 bus. the st. bernard dog. a 747 jet",
    "a $5 bill and 50% off. 3:00 clock.",
    "a dog:sitting",
    "a dog-",
    "-a dog",
    "a--b",
    "it's a 'dog' isn't it?",
    "don't can't won't shan't y'know",
    "I said no.",
    "a small kitchen -lrb- with a stove -rrb-",
    "a man 's bike and do n't go",
    "a large purple triangle left of a large blue square",
]


@pytest.mark.skipif(
    java_problem() is not None, reason=f"no Java for the reference tokenizer: {java_problem()}"
)
def test_tokenizer_matches_stanford_ptb_tokenizer() -> None:
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap holds the reference tokenizer")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The reference tokenizer drops a trailing empty line, so the list ends with text.
    expected = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    mismatches = [
        (text, expected[str(i)][0], tokenize_caption(text))
        for i, text in enumerate(CAPTIONS)
        if tokenize_caption(text) != expected[str(i)][0]
    ]
    assert mismatches == []


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A man's bike.", "a man 's bike"),
        ("Don't (really) stop!", "do n't -lrb- really -rrb- stop"),
        ("Mr. Smith, St. Louis; U.S.A.", "mr. smith st. louis u.s.a."),
        ("a sign that says no.", "a sign that says no"),
        ("bus no. 5 at 3.5 mph, 1,000 people", "bus no. 5 at 3.5 mph 1,000 people"),
        ("a “quoted” word — and… more", "a quoted word and more"),
        ("cannot\nwrap", "can not wrap"),
        ("   ", ""),
    ],
)
def test_tokenizer_known_outputs(text: str, tokens: str) -> None:
    """Pinned outputs of the Java tokenizer, so these hold on machines without Java too."""
    assert tokenize_caption(text) == tokens
