"""Data: local files and built-in offline datasets, client partitions, partition stats."""

from fedfm.data.partition import SCHEMES, partition, split_client, train_test_split
from fedfm.data.sources import BUILTINS, TextDataset, load_text_dataset
from fedfm.data.stats import format_partition_stats, partition_stats

__all__ = [
    "BUILTINS",
    "SCHEMES",
    "TextDataset",
    "format_partition_stats",
    "load_text_dataset",
    "partition",
    "partition_stats",
    "split_client",
    "train_test_split",
]
