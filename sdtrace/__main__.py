"""``python -m sdtrace``: the same as the ``sdtrace`` console script."""
import sys

from .cli import main

sys.exit(main())
