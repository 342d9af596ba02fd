"""`vgtrain bench`: training-step, efficiency (MFU), data-pipeline and decoding throughput in one
run, against a hand-written ClipCap-style loop and transformers' ``generate``; writes bench.json."""
