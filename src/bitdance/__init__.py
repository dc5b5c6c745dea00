"""bitdance: autoregressive image generation with binary visual tokens (arXiv 2602.14041)."""

__version__ = "0.1.0"
