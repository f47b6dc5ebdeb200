"""Evaluation: the compressed model against its dense base on real text.

    metrics.py  perplexity, logit drift, KL, top-1 agreement (causal LMs); embedding cosine (encoders); counts
    drift.py    output drift block by block: where the error enters
"""
