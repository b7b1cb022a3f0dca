"""Training: schedules, parameter groups, EMA teacher, checkpoints, distributed set-up, the loop."""
