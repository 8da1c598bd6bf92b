"""The site side of fedmusk: what a hospital runs and what it lets leave."""
