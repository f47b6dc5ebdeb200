"""Healing: distillation of the factors against the dense teacher, in modules of one job each.

    config.py        HealConfig, HealReport, HealStep
    teacher.py       the calibration sequences split train / held-out, the teacher's features cached once
    losses.py        the distillation losses (kl.py: the KL from the heads' inputs, a block of rows at a time)
    trainable.py     what learns (factors rebalanced, lora_B, an extra LoRA) and at what precision
    schedule.py      warm-up and cosine decay, seeded batches, when to stop
    loop.py          heal_: the loop in place, with its NaN guard
    folder.py        heal: a compressed folder in, a healed folder out
    teacher_text.py  teacher-written training text
"""
