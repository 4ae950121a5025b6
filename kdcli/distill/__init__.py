"""Knowledge distillation: one module per method, a small registry, adapters, and the distillation trainer.

Methods see the student's and the teacher's `DetectorOutput` (neck features, class logits, box deltas,
anchors) and the batch; they know nothing of the training loop.
"""
