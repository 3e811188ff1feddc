"""Readers and writers for the Extreme Classification Repository's formats.

Every reader raises :class:`FormatError` for malformed input, naming the file, the 1-based line and
the problem; nothing is skipped.
"""

from xmc.data.bow import BowWriter, read_bow, write_bow
from xmc.data.errors import FormatError

__all__ = ["BowWriter", "FormatError", "read_bow", "write_bow"]
