"""``python -m adbackends``: see :mod:`adbackends.cli`."""

import sys

from .cli import main

sys.exit(main())
