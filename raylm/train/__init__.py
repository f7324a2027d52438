"""Training on Ray Train: the driver, one worker per rank, the step loop, schedules, metrics and checkpoints."""
