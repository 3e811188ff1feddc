"""Classifier backends behind one interface (see :mod:`xmc.classifiers.base`)."""

from xmc.classifiers.base import Classifier
from xmc.classifiers.chunked import shard_range
from xmc.classifiers.dense import DenseClassifier
from xmc.classifiers.fixed_fanin import FixedFanInClassifier
from xmc.classifiers.rps import RPSClassifier

__all__ = ["Classifier", "DenseClassifier", "FixedFanInClassifier", "RPSClassifier", "shard_range"]
