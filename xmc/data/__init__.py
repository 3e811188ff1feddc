"""Readers and writers for the Extreme Classification Repository's formats.

Every reader raises :class:`FormatError` for malformed input, naming the file, the 1-based line and
the problem; nothing is skipped.
"""

from xmc.data.bow import BowWriter, read_bow, write_bow
from xmc.data.errors import FormatError
from xmc.data.formats import FORMATS, detect_format, load_labels, load_split, split_pair
from xmc.data.split import read_sparse_matrix, read_split, write_sparse_matrix, write_split
from xmc.data.text import (
    TextDataset,
    label_vocabulary,
    read_filter_labels,
    read_label_names,
    read_lf_json,
    read_text_pairs,
    write_label_names,
    write_lf_json,
    write_text_pairs,
)

__all__ = [
    "FORMATS",
    "BowWriter",
    "FormatError",
    "TextDataset",
    "detect_format",
    "label_vocabulary",
    "load_labels",
    "load_split",
    "read_bow",
    "read_filter_labels",
    "read_label_names",
    "read_lf_json",
    "read_sparse_matrix",
    "read_split",
    "read_text_pairs",
    "split_pair",
    "write_bow",
    "write_label_names",
    "write_lf_json",
    "write_sparse_matrix",
    "write_split",
    "write_text_pairs",
]
