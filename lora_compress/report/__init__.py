"""What people look at: the report folder of a compressed model, comparisons, plots, tables, inspection.

    folder.py   DIR/report/: report.md, report.json and the plots, from the manifest and evaluation figures
    compare.py  runs of one base model side by side
    plots.py    PNGs (matplotlib, no pyplot)
    tables.py   plain-text tables for the terminal
    spectra.py  singular-value spectra per layer type
    inspect.py  what ``lora-compress inspect`` prints
"""
