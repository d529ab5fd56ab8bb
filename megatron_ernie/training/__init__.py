"""The training loop room: one optimizer step for every stage (step.py); the loop, checkpoints
and metrics build on it."""
