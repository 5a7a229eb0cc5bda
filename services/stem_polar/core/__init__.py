"""Science core of stem-polar: pure functions and small classes over numpy / CuPy arrays."""
