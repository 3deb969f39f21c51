"""OuroMamba Studio engine: models, scan, data, training and evaluation (no UI imports here)."""
