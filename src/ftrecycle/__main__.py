"""``python -m ftrecycle``: the ``ftrecycle`` command."""

import sys

from ftrecycle.cli.app import main

sys.exit(main())
