"""The site side of fedmusk: what a hospital runs and what it lets leave."""

import os

# Flower reports usage to its makers unless told not to, and reads this when first imported: set it before any
# fedmusk module that uses Flower is loaded (an operator may still set it to "1").
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
