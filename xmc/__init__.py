"""xmc: extreme multi-label classification with memory-frugal classifiers."""

__version__ = "0.1.0"
