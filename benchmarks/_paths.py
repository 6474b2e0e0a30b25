"""Put ``tests/`` on ``sys.path``: benchmarks make their models with the test fixtures
(``tests/fixtures``), which are not part of the installed library."""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
