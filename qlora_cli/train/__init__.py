"""Training: preflight, the Trainer and its callbacks, checkpoints, disk, distributed runs, trackers."""
