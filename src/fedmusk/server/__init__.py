"""The coordinator side of fedmusk: rounds, checkpoints and run records."""

import os

# Flower reports usage to its makers unless told not to, and reads this when first imported: set it before any
# fedmusk module that uses Flower is loaded (an operator may still set it to "1").
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
