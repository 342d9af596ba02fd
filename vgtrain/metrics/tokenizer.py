"""PTB-style caption tokenisation, as the COCO caption evaluation does it, in pure Python.

The reference (``pycocoevalcap.tokenizer.PTBTokenizer``) runs Stanford CoreNLP 3.4.1's
``PTBTokenizer -preserveLines -lowerCase`` over each caption and then drops the tokens in its
``PUNCTUATIONS`` list. This module reproduces that output for caption text without Java:

- lower-cased tokens joined by single spaces; whitespace-only captions become ``""``;
- punctuation split off words: ``dog.`` -> ``dog``, ``(a)`` -> ``-lrb- a -rrb-`` (the reference's
  list holds the upper-case ``-LRB-``, so after lower-casing brackets survive, as they do there);
- clitics split: ``don't`` -> ``do n't``, ``dog's`` -> ``dog 's``, ``cannot`` -> ``can not``;
- abbreviations (``mr.``, ``st.``, ``u.s.``, single letters) keep their period; numbers such as
  ``3.5``, ``1,000`` and ``5:30`` and hyphenated words stay whole;
- typographic quotes, dashes and ellipses are normalised as CoreNLP does, then removed.

Rare constructs of CoreNLP's lexer (URLs, e-mail addresses, emoticons, SGML) are not reproduced;
tests/test_metrics_tokenizer.py compares this module with the Java tokenizer on caption text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# pycocoevalcap's PUNCTUATIONS, verbatim; it filters lower-cased tokens, so its upper-case bracket
# tokens never match (see above).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Abbreviations CoreNLP keeps with their period (titles, months, companies, states, misc.);
# case-insensitive, as its lexer is.
ABBREVIATIONS = frozenset(
    """mr mrs ms miss dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev
    maj sgt cpl pvt capt st ste sta ave pres lieut hon brig cmdr comdr pfc spc supt supts det mt ft
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    ala ariz ark calif colo conn dak del fla ga ill ind kan kans ky la mass md mich minn mo mont neb
    nev okla ore pa penn tenn tex va vt wash wis wyo inc co cos corp ltd plc bancorp dept blvd rd
    jr sr bros esq etc vs tel est ext sq viz cf""".split()
)
# Abbreviations only before a number ("no. 5", but "says no." ends a sentence).
NUMBER_ABBREVIATIONS = frozenset("no nos ca fig figs vol vols approx pp op art arts sec sect apt res".split())

# Words CoreNLP splits into two tokens although they have no apostrophe.
ASSIMILATIONS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
    "'tis": ("'t", "is"),
    "'twas": ("'t", "was"),
}
# Words that keep a leading apostrophe ('cause), and prefixes split off with theirs (y'all).
APOSTROPHE_WORDS = frozenset(["'cause", "'em", "'til", "'till"])
APOSTROPHE_PREFIXES = ("y'", "th'")
CLITICS = ("n't", "'s", "'m", "'d", "'re", "'ve", "'ll")
BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

# Character normalisation CoreNLP applies before (or while) lexing.
_NORMALISE = str.maketrans(
    {
        "\u2019": "'",  # right single quote: an apostrophe inside words
        "\u201b": "'",
        "\u2018": " ` ",  # left single quote: an opening quote, split off
        "\u201c": ' " ',
        "\u201d": ' " ',
        "\u201e": ' " ',
        "\u2013": " -- ",  # en and em dashes: the PTB "--" token
        "\u2014": " -- ",
        "\u2026": " ... ",
        "\u00bd": "1/2",
        "\u00bc": "1/4",
        "\u00be": "3/4",
        "\u00a0": " ",
    }
)

# One token at the current position; alternatives are tried in order (a lexer's priorities).
_TOKEN = re.compile(
    r"""
    (?P<url>\w+://[^\s<>"]*[^\s<>".,;:!?'-]|[\w.%+-]+@\w[\w.-]*\w|[#@]\w+)  # URLs, e-mail, #tag, @user
  | (?P<bracket>-(?:lrb|rrb|lsb|rsb|lcb|rcb)-)                    # already escaped brackets
  | (?P<clitic>(?:'(?:s|m|d|re|ve|ll)|n't)(?!\w))              # already split: "do n't", "man 's"
  | (?P<dotted>(?:[^\W\d_]\.){2,})                              # u.s.a.  p.m.  e.g.
  | (?P<number>\d+(?:[.,:/]\d+)+(?![\w]))                       # 3.5  1,000  5:30  1/2
  | (?P<word>\w+(?:(?:[-./&_]|'(?=[^\W\d_]))\w+)*)             # words, hyphenated, dotted, o'clock
  | (?P<dots>\.\.\.+|\.(?:\s\.){2,})                            # ellipsis
  | (?P<dashes>--+)
  | (?P<marks>[?!]+)                                            # ? ! ?! ???
  | (?P<quotes>''|``|["'`])
  | (?P<other>\S)
    """,
    re.VERBOSE | re.IGNORECASE,
)


def _split_word(word: str) -> list[str]:
    """A word token -> its PTB tokens: assimilations and clitics split off."""
    lower = word.lower()
    if lower in ASSIMILATIONS:
        first, second = ASSIMILATIONS[lower]
        return [word[: len(first)], word[len(first) :]]
    if "&" in word:  # AT&T stays whole, b&w does not: CoreNLP keeps only capitalised company names
        left, _, right = word.partition("&")
        if not (left.isupper() and right.isupper()):
            return [*_split_word(left), "&", *_split_word(right)]
    for prefix in APOSTROPHE_PREFIXES:
        if lower.startswith(prefix) and len(word) > len(prefix):
            return [word[: len(prefix)], *_split_word(word[len(prefix) :])]
    for clitic in CLITICS:
        if lower.endswith(clitic) and len(word) > len(clitic):
            return [*_split_word(word[: -len(clitic)]), word[-len(clitic) :]]
    return [word]


def _is_abbreviation(core: str, rest: str) -> bool:
    """``core`` (a word before a period, ``rest`` the text after that period) is an abbreviation
    that CoreNLP keeps together with its period."""
    lower = core.lower()
    if lower in NUMBER_ABBREVIATIONS:
        return rest.lstrip()[:1].isdigit()
    return (len(core) == 1 and core.isalpha()) or lower in ABBREVIATIONS


def ptb_tokens(text: str) -> list[str]:
    """The Stanford PTB tokens of one line of text, before lower-casing and punctuation removal."""
    text = text.translate(_NORMALISE)
    tokens: list[str] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return tokens
        match = _TOKEN.match(text, position)
        assert match is not None  # (?P<other>\S) matches any non-space character
        kind, value = match.lastgroup, match.group()
        position = match.end()
        if kind == "word":
            # A trailing period belongs to an abbreviation ("mr.", "st."), else it is punctuation.
            if text.startswith(".", position) and not text.startswith("..", position):
                if _is_abbreviation(value, text[position + 1 :]) and "'" not in value:
                    tokens.append(value + ".")
                    position += 1
                    continue
            # A leading apostrophe is a quote, except in 'tis, 'cause and the like.
            start = position - len(value)
            quoted = ("'" + value).lower()
            if (
                start > 0
                and text[start - 1] == "'"
                and (quoted in ASSIMILATIONS or quoted in APOSTROPHE_WORDS)
            ):
                tokens.pop()
                value = "'" + value
            tokens.extend(_split_word(value))
        elif kind == "dots":
            tokens.append("...")
        elif kind == "quotes":
            tokens.append({'"': "''", "`": "`"}.get(value, value))
        elif kind == "other":
            tokens.append(BRACKETS.get(value, value))
        else:
            tokens.append(value)


def tokenize_caption(text: str) -> str:
    """One caption as pycocoevalcap's PTBTokenizer returns it: lower-cased PTB tokens without
    punctuation, joined by single spaces (newlines inside a caption count as spaces)."""
    tokens = ptb_tokens(text.replace("\n", " ").replace("\r", " "))
    lowered = (token.lower() for token in tokens)
    return " ".join(token for token in lowered if token not in PUNCTUATIONS)


def tokenize(captions: dict[str, Iterable[str]]) -> dict[str, list[str]]:
    """``{id: [caption, ...]}`` -> ``{id: [tokenized caption, ...]}``, like ``PTBTokenizer.tokenize``
    (which takes ``{id: [{"caption": ...}, ...]}``)."""
    return {key: [tokenize_caption(text) for text in texts] for key, texts in captions.items()}
