"""The fault catalogue's table: cases per command and per class of fault, and how many ended clean.

tests/test_faults.py tags each case it runs with ``CATALOGUE_PROPERTY``; tests/conftest.py gathers the
outcomes and prints :func:`table` at the end of the run; scripts/fault_catalogue.py prints the catalogue's
size without running it.
"""
from __future__ import annotations

from lora_compress.report.tables import render

CATALOGUE_PROPERTY = "fault"  # user property of a catalogue case: (command, class)
COMMANDS = ("compress", "inspect", "evaluate", "export", "extract", "heal", "compare", "from_pretrained")


def table(cases: list[tuple[str, str, bool | None]]) -> str:
    """One row per command, one column per class: ``clean/tried`` (just ``tried`` when none ran).

    Args:
        cases: ``(command, class, clean)``; clean is None for a case listed, not run.
    """
    kinds = sorted({kind for _, kind, _ in cases})
    commands = [c for c in COMMANDS if any(case[0] == c for case in cases)]
    ran = any(clean is not None for _, _, clean in cases)

    def cell(selected) -> str:
        if not selected:
            return "-"
        clean = sum(1 for *_, ok in selected if ok)
        return f"{clean}/{len(selected)}" if ran else str(len(selected))

    rows = [[command, *(cell([c for c in cases if c[:2] == (command, kind)]) for kind in kinds),
             cell([c for c in cases if c[0] == command])] for command in commands]
    rows.append(["all", *(cell([c for c in cases if c[1] == kind]) for kind in kinds), cell(cases)])
    note = "clean/tried: exit 2, one line matching its message, the place unchanged" if ran else "cases"
    return render(rows, ["command", *kinds, "all"]) + f"\n({note})"
