"""Science core of the scaler: relative scaling model (seed 003) and absolute scaling (seed 002 phase 4)."""
