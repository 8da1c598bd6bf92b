"""``fedmusk prepare``: tile every usable slide and cache the frozen base model's tile features inside the site."""
