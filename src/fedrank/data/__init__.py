"""Datasets (packaged BBC News, JSONL/CSV files, Hugging Face datasets) and client partitions.

The partitions (``fedrank.data.partition``) import the datasets library and Flower Datasets: import them from
there, only where a run partitions its data, so that a process that reads cached shards never loads them.
"""

from fedrank.data.sources import Splits, TextDataset, load_splits, utf8_lines

__all__ = ["Splits", "TextDataset", "load_splits", "utf8_lines"]
