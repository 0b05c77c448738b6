"""The training engine: task loop, evaluation, metrics, checkpoints, distributed execution."""
