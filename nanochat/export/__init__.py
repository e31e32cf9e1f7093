"""Models out of nanochat: `hf.py` writes a Hugging Face transformers model directory; `modeling_nanochat.py`
is the model code that goes into it (a data file of this package, imported here only to save with it)."""
