"""Training engine pieces that know nothing about Flower: evaluation metrics and report plots."""
