"""Encoder compression: FiPS (shared bases with sparse factors for a transformer's MLPs), its storage
format and its fit. Import the modules themselves; this package imports nothing."""
