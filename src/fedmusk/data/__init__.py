"""A site's own data: the manifest, slides and their tiles, pathology reports, validation and scrubbing.

Nothing here leaves the site. Import the submodules you need (``fedmusk.data.slides``, ``fedmusk.data.tiles``, ...);
this package imports nothing heavy on its own.
"""
