"""adalora-cli: adaptive-rank low-rank adapters for Transformer encoders, under a parameter budget."""

__version__ = "0.1.0"
