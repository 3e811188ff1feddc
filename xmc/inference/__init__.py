"""Inference: run and condensed folders, the predictors behind ``xmc.load``, top-k over all labels,
prediction files and ``xmc export``. Import the modules themselves; this package imports nothing."""
