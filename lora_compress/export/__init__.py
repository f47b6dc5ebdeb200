"""Formats other tools load: fine-tunes as PEFT LoRA adapters, compressed folders as dense checkpoints.

    extract.py      a fine-tune's delta (tuned − base) factored into a LoRA adapter
    peft_format.py  the PEFT adapter folder, written and read (merged into a base)
    dense.py        plain transformers checkpoints from a compressed folder or an adapter
    upgrade.py      a compressed folder of an older format rewritten in today's
"""
