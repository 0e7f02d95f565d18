"""Data, not code: the GPU catalog, the model architecture catalog and recommended hyperparameters."""

from pathlib import Path

TABLES_DIR = Path(__file__).resolve().parent
