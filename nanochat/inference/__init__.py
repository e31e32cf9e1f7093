"""Inference: `engine.py` (Engine: prefill, then sample with the calculator tool; TextStream), `decoder.py`
(the static, compiled decode step and its attention paths), `sampling.py` (next-token draws) and
`tools.py` (the calculator and the per-row tool-call state machine). The web server (nanochat.web) builds
its continuous batching on the same parts."""
