"""The folder verbs behind the CLI: a checkpoint folder in, a compressed folder out, and its evaluation.

    compress.py  compress(MODEL, OUT, config): in memory, or streamed tensor by tensor / block by block
    evaluate.py  evaluate_folder(BASE, DIR, text): the compressed folder against its base
"""
