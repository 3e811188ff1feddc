"""xmc: extreme multi-label classification with memory-frugal classifiers."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `xmc.load` imports torch; keep `import xmc` (and `xmc --version`) light.
    if name == "load":
        from xmc.inference.predictor import load

        return load
    raise AttributeError(f"module 'xmc' has no attribute {name!r}")
