"""LightningDataModules: in memory (digits, any table, synthetic data) and images from disk."""

from kiln.data.digit_images import DigitImagesDataModule
from kiln.data.digits import DigitsDataModule
from kiln.data.images import ImageFolderDataModule
from kiln.data.synthetic import SyntheticDataModule
from kiln.data.table import TableDataModule

__all__ = [
    "DigitImagesDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "TableDataModule",
]
