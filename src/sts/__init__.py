"""sts: predict cross-domain transfer of fine-tuning from shifted SAE features (STS)."""

__version__ = "0.1.0"
