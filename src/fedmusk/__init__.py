"""fedmusk: federated fine-tuning of the MUSK pathology foundation model across hospitals."""

__version__ = "0.1.0"
