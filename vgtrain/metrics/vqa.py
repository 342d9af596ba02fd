"""VQA accuracy with the official answer normalisation (the VQA challenge's ``vqaEval.py``).

Normalisation, as the official evaluation applies it to a predicted answer: newlines and tabs to
spaces, strip; punctuation (removed where it touches a space or the text has a digit-comma-digit,
else replaced by a space; a period not followed by a digit removed); lower case; number words to
digits (``none``/``zero`` -> 0 ... ``ten`` -> 10); articles (a, an, the) dropped; contractions
written without an apostrophe restored (``dont`` -> ``don’t``, with the official table's quotes).

Accuracy of one answer against N reference answers: for each reference, the share of the *other*
references equal to the answer, over 3, capped at 1 (``min(#matches / 3, 1)``), averaged over
the N leave-one-out subsets (the ten 9-of-10 subsets for VQAv2's ten answers).

The official script normalises the references' punctuation only (never articles or number
words), and only when the references disagree: VQAv2's answers were normalised when collected.
``official=True`` reproduces that exactly; the default normalises references like predictions,
so data whose references were not pre-normalised (``"two"``, ``"a dog"``) scores as intended.
On pre-normalised references both agree. For single-answer data use :func:`exact_match`
(the formula gives 0 with one reference: there is no other reference to agree with).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?")
# The official pattern's "(?!<=\d)" is a lookahead for the literal "<=" plus a digit, not a
# lookbehind: in effect a period is removed unless a digit follows it ("2.5" keeps its period).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")

# The official contraction table (its mix of straight and typographic apostrophes kept).
_Q = "\u2019"
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": f"couldn{_Q}t{_Q}ve", f"couldnt{_Q}ve": f"couldn{_Q}t{_Q}ve", "didnt": f"didn{_Q}t",
    "doesnt": f"doesn{_Q}t", "dont": f"don{_Q}t", "hadnt": f"hadn{_Q}t", f"hadnt{_Q}ve": f"hadn{_Q}t{_Q}ve",
    "hadn'tve": f"hadn{_Q}t{_Q}ve", "hasnt": f"hasn{_Q}t", "havent": f"haven{_Q}t", "hed": f"he{_Q}d",
    f"hed{_Q}ve": f"he{_Q}d{_Q}ve", f"he{_Q}dve": f"he{_Q}d{_Q}ve", "hes": f"he{_Q}s", "howd": f"how{_Q}d",
    "howll": f"how{_Q}ll", "hows": f"how{_Q}s", f"Id{_Q}ve": f"I{_Q}d{_Q}ve", f"I{_Q}dve": f"I{_Q}d{_Q}ve",
    "Im": f"I{_Q}m", "Ive": f"I{_Q}ve", "isnt": f"isn{_Q}t", "itd": f"it{_Q}d", f"itd{_Q}ve": f"it{_Q}d{_Q}ve",
    f"it{_Q}dve": f"it{_Q}d{_Q}ve", "itll": f"it{_Q}ll", f"let{_Q}s": f"let{_Q}s", "maam": f"ma{_Q}am",
    "mightnt": f"mightn{_Q}t", f"mightnt{_Q}ve": f"mightn{_Q}t{_Q}ve", f"mightn{_Q}tve": f"mightn{_Q}t{_Q}ve",
    "mightve": f"might{_Q}ve", "mustnt": f"mustn{_Q}t", "mustve": f"must{_Q}ve", "neednt": f"needn{_Q}t",
    "notve": f"not{_Q}ve", "oclock": f"o{_Q}clock", "oughtnt": f"oughtn{_Q}t",
    f"ow{_Q}s{_Q}at": f"{_Q}ow{_Q}s{_Q}at", f"{_Q}ows{_Q}at": f"{_Q}ow{_Q}s{_Q}at",
    f"{_Q}ow{_Q}sat": f"{_Q}ow{_Q}s{_Q}at", "shant": f"shan{_Q}t", f"shed{_Q}ve": f"she{_Q}d{_Q}ve",
    f"she{_Q}dve": f"she{_Q}d{_Q}ve", f"she{_Q}s": f"she{_Q}s", "shouldve": f"should{_Q}ve",
    "shouldnt": f"shouldn{_Q}t", f"shouldnt{_Q}ve": f"shouldn{_Q}t{_Q}ve",
    f"shouldn{_Q}tve": f"shouldn{_Q}t{_Q}ve", f"somebody{_Q}d": "somebodyd",
    f"somebodyd{_Q}ve": f"somebody{_Q}d{_Q}ve", f"somebody{_Q}dve": f"somebody{_Q}d{_Q}ve",
    "somebodyll": f"somebody{_Q}ll", "somebodys": f"somebody{_Q}s", "someoned": f"someone{_Q}d",
    f"someoned{_Q}ve": f"someone{_Q}d{_Q}ve", f"someone{_Q}dve": f"someone{_Q}d{_Q}ve",
    "someonell": f"someone{_Q}ll", "someones": f"someone{_Q}s", "somethingd": f"something{_Q}d",
    f"somethingd{_Q}ve": f"something{_Q}d{_Q}ve", f"something{_Q}dve": f"something{_Q}d{_Q}ve",
    "somethingll": f"something{_Q}ll", "thats": f"that{_Q}s", "thered": f"there{_Q}d",
    f"thered{_Q}ve": f"there{_Q}d{_Q}ve", f"there{_Q}dve": f"there{_Q}d{_Q}ve", "therere": f"there{_Q}re",
    "theres": f"there{_Q}s", "theyd": f"they{_Q}d", f"theyd{_Q}ve": f"they{_Q}d{_Q}ve",
    f"they{_Q}dve": f"they{_Q}d{_Q}ve", "theyll": f"they{_Q}ll", "theyre": f"they{_Q}re",
    "theyve": f"they{_Q}ve", "twas": f"{_Q}twas", "wasnt": f"wasn{_Q}t", f"wed{_Q}ve": f"we{_Q}d{_Q}ve",
    f"we{_Q}dve": f"we{_Q}d{_Q}ve", "weve": "we've", "werent": f"weren{_Q}t", "whatll": f"what{_Q}ll",
    "whatre": f"what{_Q}re", "whats": f"what{_Q}s", "whatve": f"what{_Q}ve", "whens": f"when{_Q}s",
    "whered": f"where{_Q}d", "wheres": "where's", "whereve": f"where{_Q}ve", "whod": f"who{_Q}d",
    f"whod{_Q}ve": f"who{_Q}d{_Q}ve", f"who{_Q}dve": f"who{_Q}d{_Q}ve", "wholl": f"who{_Q}ll",
    "whos": f"who{_Q}s", "whove": "who've", "whyll": f"why{_Q}ll", "whyre": f"why{_Q}re",
    "whys": f"why{_Q}s", "wont": f"won{_Q}t", "wouldve": f"would{_Q}ve", "wouldnt": f"wouldn{_Q}t",
    f"wouldnt{_Q}ve": f"wouldn{_Q}t{_Q}ve", f"wouldn{_Q}tve": f"wouldn{_Q}t{_Q}ve", "yall": f"y{_Q}all",
    f"yall{_Q}ll": f"y{_Q}all{_Q}ll", f"y{_Q}allll": f"y{_Q}all{_Q}ll", f"yall{_Q}d{_Q}ve": f"y{_Q}all{_Q}d{_Q}ve",
    f"y{_Q}alld{_Q}ve": f"y{_Q}all{_Q}d{_Q}ve", f"y{_Q}all{_Q}dve": f"y{_Q}all{_Q}d{_Q}ve",
    "youd": f"you{_Q}d", f"youd{_Q}ve": f"you{_Q}d{_Q}ve", f"you{_Q}dve": f"you{_Q}d{_Q}ve",
    "youll": f"you{_Q}ll", "youre": f"you{_Q}re", "youve": f"you{_Q}ve",
}  # fmt: skip


def strip_punctuation(text: str) -> str:
    """The official ``processPunctuation``."""
    out = text
    drop_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if drop_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def digits_and_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words, articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer as the official evaluation compares it."""
    return digits_and_articles(strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, references: Sequence[str], *, official: bool = False) -> float:
    """min(#matching other references / 3, 1), averaged over the leave-one-out subsets."""
    if not references:
        raise ValueError("VQA accuracy needs at least one reference answer")
    answer = normalize_answer(prediction)
    if official:
        refs = list(references)
        if len(set(refs)) > 1:
            refs = [strip_punctuation(ref) for ref in refs]
    else:
        refs = [normalize_answer(ref) for ref in references]
    matches = sum(ref == answer for ref in refs)
    # Leaving out a matching reference leaves matches - 1 others; leaving out another, matches.
    total = sum(min(1.0, (matches - (ref == answer)) / 3) for ref in refs)
    return total / len(refs)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    answer = normalize_answer(prediction)
    return float(any(normalize_answer(ref) == answer for ref in references))


def answer_score(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy where there are several references, exact match where there is one."""
    if len(references) > 1:
        return vqa_accuracy(prediction, references)
    return exact_match(prediction, references)
