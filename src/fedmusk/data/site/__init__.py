"""A site folder as fedmusk reads it: the manifest, pathology reports, the optional pretraining folder, the checks
``fedmusk validate`` runs over all of them, and the scrubber every outgoing text passes through."""
