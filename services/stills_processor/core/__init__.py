"""Science of stills-processor: routing, the DIALS workflows, geometric validation (no bus, no file layout)."""
