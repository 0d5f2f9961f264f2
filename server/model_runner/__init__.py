"""Turns a SchedulerOutput into one forward pass and one batched sampling step."""
