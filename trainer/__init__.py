"""Training components used by train.py: config, distributed setup and parallelization, checkpoints, logging."""
