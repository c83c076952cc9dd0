"""Waterbirds for GroupDistil: landbird / waterbird classification with the background as spurious attribute."""
from .pipeline import WaterbirdsPipeline
from .synthetic import synthesize

__all__ = ["WaterbirdsPipeline", "synthesize"]
