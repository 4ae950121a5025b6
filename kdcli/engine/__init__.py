"""The training engine: trainer loop, callbacks, checkpoints, EMA, schedule, validator and metrics."""
