"""Memory: the planner's estimates (``xmc memory``), the encoders' tables, measurement of a training step
and the plot. Import the modules themselves; this package imports nothing."""
