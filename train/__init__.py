"""The Accelerate training loop (``python -m train`` / ``accelerate launch -m train``)."""

from .trainer import main, train

__all__ = ["main", "train"]
