"""The run-level application: train, evaluate, predict, import-torch, run folders, configuration checks."""
