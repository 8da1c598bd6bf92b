"""Synthetic multi-site cohorts (``fedmusk synth``): latent biology, outcomes, reports, tissue and slides in each
hospital's scanner format, written as real site folders."""
