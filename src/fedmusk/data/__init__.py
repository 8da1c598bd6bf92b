"""A site's own data. Nothing here leaves the site.

- ``slides``: opening whole-slide images (DICOM WSI, SVS/TIFF, tile folders), tissue detection, tiling, tile loading;
- ``site``: the site folder's manifest, reports and pretraining pairs, its validation, and the scrubber;
- ``prepare``: ``fedmusk prepare`` and the per-slide tile and feature cache it writes;
- ``synth``: synthetic multi-site cohorts written as real site folders (tests, demos, benchmarks).

Import the submodules you need; this package imports nothing heavy on its own.
"""
