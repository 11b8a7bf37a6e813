"""LightningDataModules that hold their data in memory: digits, any table, synthetic data."""

from kiln.data.digits import DigitsDataModule
from kiln.data.synthetic import SyntheticDataModule
from kiln.data.table import TableDataModule

__all__ = ["DigitsDataModule", "SyntheticDataModule", "TableDataModule"]
