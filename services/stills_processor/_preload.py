"""Imported by the forkserver before it forks pool workers: DIALS is loaded once and shared copy-on-write."""
from .batch import warm_up

warm_up()
