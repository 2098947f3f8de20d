"""pyforge: a small LLM inference server with a compiled core."""

__version__ = "0.1.0"
