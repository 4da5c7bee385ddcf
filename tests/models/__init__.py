"""Scripts that build or train the compiler's test and benchmark models (no downloads)."""
