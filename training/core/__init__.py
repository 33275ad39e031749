"""The shared core of every stage: config, data, the loop, BN, schedules, metrics, statistics,
checkpoints, run folders, progress, torchrun support, provenance."""
