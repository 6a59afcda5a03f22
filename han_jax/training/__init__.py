"""The step machinery: specification, steps, device layouts, learning-rate schedule, checkpoints, compilation cache."""
