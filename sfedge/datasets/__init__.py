"""Demo data built from the real photographs scikit-image ships (no downloads)."""
