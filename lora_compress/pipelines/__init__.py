"""The pipelines that run a method over a model: data-free (in memory, a tensor at a time, torchrun) and
calibrated (block by block over a BlockSource, in memory or streamed). plan.py picks one, once, from what
the method declares."""
