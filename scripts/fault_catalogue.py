"""Print the fault catalogue's size: cases per command and per class of fault (tests/test_faults.py).

    python scripts/fault_catalogue.py            the table of cases, without running them
    python scripts/fault_catalogue.py --list     also every case: command, class, name

Running them prints the same table with how many ended clean: python -m pytest tests/test_faults.py -q
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fault_catalogue import table  # noqa: E402
from test_faults import catalogue  # noqa: E402


def main() -> None:
    cases = catalogue()
    if "--list" in sys.argv[1:]:
        for command, kind, name in cases:
            print(f"{command:9} {kind:20} {name}")
    print(table([(command, kind, None) for command, kind, _ in cases]))


if __name__ == "__main__":
    main()
