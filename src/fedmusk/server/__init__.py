"""The coordinator side of fedmusk: rounds, checkpoints and run records."""
