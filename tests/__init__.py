"""The test suite; `ROOT` is the repository, `FIXTURES` the fixture trees."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
