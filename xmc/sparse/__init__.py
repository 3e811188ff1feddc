"""Sparse topology of fixed fan-in layers: id initialization (random, centroid), dynamic sparse training
(SET, RigL, SRigL's neuron ablation) and its schedule in the training loop. Import the modules
themselves; this package imports nothing."""
