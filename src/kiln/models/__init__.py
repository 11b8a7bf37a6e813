"""The LightningModule (`KilnModule`) and the plain nets it trains (`nets.mlp`, `nets.cnn`)."""

from kiln.models.module import KilnModule

__all__ = ["KilnModule"]
