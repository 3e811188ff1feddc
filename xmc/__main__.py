import sys

from xmc.cli import main

sys.exit(main())
