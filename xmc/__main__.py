import sys
from pathlib import Path

# `python -m xmc` puts the working directory first on sys.path. Run from a checkout's root, that lets the
# top-level kernels/ folder (installed as xmc.kernels) shadow the Hugging Face `kernels` package, which
# transformers requires and imports. xmc itself is already imported, so the root can go.
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "kernels" / "__init__.py").exists():
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]

from xmc.cli import main  # noqa: E402

sys.exit(main())
