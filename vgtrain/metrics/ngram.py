"""BLEU-1..4, ROUGE-L and CIDEr-D over tokenized captions, as the COCO caption evaluation
(``pycocoevalcap``) computes them, in pure Python.

Inputs are ``{image_id: [caption]}`` (one candidate) and ``{image_id: [reference, ...]}``, already
tokenized (:func:`vgtrain.metrics.tokenizer.tokenize`). Each function returns the corpus score and
the per-image scores, in the order of ``candidates``.

- BLEU: corpus level (clipped n-gram counts and lengths summed over images), brevity penalty from
  the reference length closest to each candidate (the shorter on a tie); ``1e-9``/``1e-15``
  smoothing as the reference, so an empty candidate scores ~0 instead of dividing by zero.
- ROUGE-L: F-measure of the longest common subsequence with the best reference (beta = 1.2),
  averaged over images.
- CIDEr-D: TF-IDF n-gram vectors (n = 1..4, document frequencies from the references of the whole
  set), candidate counts clipped at the reference's, Gaussian length penalty (sigma = 6), x10.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

Ngrams = Counter[tuple[str, ...]]


def _check(candidates: dict[str, list[str]], references: dict[str, list[str]]) -> None:
    if candidates.keys() != references.keys():
        missing = sorted(references.keys() - candidates.keys())[:3]
        extra = sorted(candidates.keys() - references.keys())[:3]
        raise ValueError(
            f"candidates and references cover different images (missing {missing}, extra {extra})"
        )
    for key, values in candidates.items():
        if len(values) != 1:
            raise ValueError(f"image {key!r}: expected exactly one candidate caption, got {len(values)}")
        if not references[key]:
            raise ValueError(f"image {key!r}: no reference caption")


def ngram_counts(words: Sequence[str], n: int = 4) -> Ngrams:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(
    candidates: dict[str, list[str]], references: dict[str, list[str]], n: int = 4
) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n and the per-image BLEU-1..n (``scores[k][i]``: BLEU-(k+1) of image i)."""
    _check(candidates, references)
    small, tiny = 1e-9, 1e-15
    total_guess, total_correct = [0] * n, [0] * n
    total_test = total_ref = 0
    per_image: list[list[float]] = [[] for _ in range(n)]
    for key, (candidate,) in candidates.items():
        words = candidate.split()
        max_ref: dict[tuple[str, ...], int] = {}
        ref_lengths = []
        for reference in references[key]:
            ref_words = reference.split()
            ref_lengths.append(len(ref_words))
            for gram, count in ngram_counts(ref_words, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), count)
        test_len = len(words)
        ref_len = min((abs(length - test_len), length) for length in ref_lengths)[1]
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in ngram_counts(words, n).items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)
        total_test += test_len
        total_ref += ref_len
        score = 1.0
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
            score *= (correct[k] + tiny) / (guess[k] + small)
            per_image[k].append(score ** (1.0 / (k + 1)))
        ratio = (test_len + tiny) / (ref_len + small)
        if ratio < 1:
            for k in range(n):
                per_image[k][-1] *= math.exp(1 - 1 / ratio)
    corpus, score = [], 1.0
    for k in range(n):
        score *= (total_correct[k] + tiny) / (total_guess[k] + small)
        corpus.append(score ** (1.0 / (k + 1)))
    ratio = (total_test + tiny) / (total_ref + small)
    if ratio < 1:
        corpus = [value * math.exp(1 - 1 / ratio) for value in corpus]
    return corpus, per_image


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(
    candidates: dict[str, list[str]], references: dict[str, list[str]], beta: float = 1.2
) -> tuple[float, list[float]]:
    """Mean ROUGE-L F-measure. Captions are split on single spaces as the reference does, so an empty
    candidate is one empty token (length 1) and scores 0."""
    _check(candidates, references)
    scores = []
    for key, (candidate,) in candidates.items():
        cand = candidate.split(" ")
        lcs = [_lcs_length(reference.split(" "), cand) for reference in references[key]]
        precision = max(length / len(cand) for length in lcs)
        recall = max(
            length / len(reference.split(" ")) for length, reference in zip(lcs, references[key], strict=True)
        )
        if precision and recall:
            scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
        else:
            scores.append(0.0)
    return (sum(scores) / len(scores) if scores else 0.0), scores


def _tfidf(counts: Ngrams, df: dict[tuple[str, ...], float], log_n: float, n: int):
    """Per-order TF-IDF vectors, their norms, and the caption length (the number of unigrams)."""
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
    norms = [0.0] * n
    for gram, tf in counts.items():
        order = len(gram) - 1
        value = tf * (log_n - math.log(max(1.0, df.get(gram, 0.0))))
        vectors[order][gram] = value
        norms[order] += value * value
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    # The reference counts "length" over bigrams (its `n == 1` is the 0-based order): kept for parity.
    return vectors, [math.sqrt(v) for v in norms], length


def cider_d(
    candidates: dict[str, list[str]], references: dict[str, list[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """Mean CIDEr-D; document frequencies come from the references of these images."""
    _check(candidates, references)
    ref_counts = {key: [ngram_counts(r.split(), n) for r in refs] for key, refs in references.items()}
    df: Counter[tuple[str, ...]] = Counter()
    for counts in ref_counts.values():
        df.update({gram for ref in counts for gram in ref})
    log_n = math.log(float(len(ref_counts))) if ref_counts else 0.0
    scores = []
    for key, (candidate,) in candidates.items():
        vec, norm, length = _tfidf(ngram_counts(candidate.split(), n), df, log_n, n)
        total = [0.0] * n
        for ref in ref_counts[key]:
            ref_vec, ref_norm, ref_length = _tfidf(ref, df, log_n, n)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for k in range(n):
                value = sum(
                    min(v, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, v in vec[k].items()
                )
                if norm[k] != 0 and ref_norm[k] != 0:
                    value /= norm[k] * ref_norm[k]
                total[k] += value * penalty
        scores.append(sum(total) / n / len(ref_counts[key]) * 10.0)
    return (sum(scores) / len(scores) if scores else 0.0), scores
