"""Storage: checkpoints in, compressed folders out, with safetensors only (never a pickle).

    checkpoint.py  dense checkpoints: folder, shards, GGUF, Hub → a transformers model
    compressed.py  the compressed folder: weights + factors, manifest, load(), apply_adapters()
    shards.py      compressed folders written a tensor at a time, in shards
    tensorfile.py  one .safetensors file written a tensor at a time
    output.py      output folders that appear whole or not at all
    card.py        README.md model cards
    text.py        user text files (evaluation and calibration text)
"""
