"""The site training engine: outcome and pretraining trainers behind one session, model bundles, prediction and
plots. Nothing here knows about Flower."""
