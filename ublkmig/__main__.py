"""``python -m ublkmig``."""

import sys

from ublkmig.cli import main

sys.exit(main())
