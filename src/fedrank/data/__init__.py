"""Datasets (packaged BBC News, JSONL/CSV files, Hugging Face datasets) and client partitions."""

from fedrank.data.partition import QualityPartitioner, high_quality_clients, local_split, partition
from fedrank.data.sources import Splits, TextDataset, load_splits, utf8_lines

__all__ = [
    "QualityPartitioner",
    "Splits",
    "TextDataset",
    "high_quality_clients",
    "load_splits",
    "local_split",
    "partition",
    "utf8_lines",
]
