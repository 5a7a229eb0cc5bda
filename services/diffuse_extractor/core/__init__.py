"""The science of diffuse extraction: geometry, corrections, masks, per-still extraction."""
