"""The detector: ResNet trunk, CEM, FPN/PAFPN, shared head, anchors, assignment, losses, post-processing.

Nothing here knows about distillation; distillation reads the `DetectorOutput` the detector returns.
"""
