"""adalora-cli: adaptive-rank low-rank adapters for Transformer models, under a parameter budget."""

__version__ = "0.1.0"
