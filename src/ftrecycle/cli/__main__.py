"""``python -m ftrecycle.cli``."""

import sys

from ftrecycle.cli.app import main

sys.exit(main())
