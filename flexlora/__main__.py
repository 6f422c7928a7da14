"""``python -m flexlora`` = the ``flexlora`` command."""

import sys

from .cli import main

sys.exit(main())
