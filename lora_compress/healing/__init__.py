"""Healing: distillation of the factors against the dense teacher.

    distill.py       HealConfig, heal_/heal: the training loop
    kl.py            the distillation KL from the heads' inputs, a block of rows at a time
    teacher_text.py  teacher-written training text
"""
