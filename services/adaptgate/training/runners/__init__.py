"""Where training runs: the runner protocol, Ray tasks, the worker's base model, checkpoints and the update stream."""
