"""nanochat: a small, readable, fast full-stack ChatGPT-like system."""
__version__ = "0.1.0"
