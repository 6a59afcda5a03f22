"""What every layer shares: the batch format, the precision policy, masked reductions, the Kendall aggregate,
whole-file writes."""
