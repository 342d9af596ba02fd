"""Evaluating a trained adapter: held-out greedy captions with a shuffled-image control
(:mod:`~vgtrain.evaluation.heldout`) and the self-contained HTML report of `vgtrain eval`
(:mod:`~vgtrain.evaluation.report`)."""
