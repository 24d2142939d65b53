"""clipdet: detect AI-generated images with frozen CLIP embeddings and few-shot heads."""

from ._version import __version__

__all__ = ["__version__"]
