"""Synthetic datasets rendered with the simulator's nanoBragg physics (independent of the extraction code).

:mod:`.stills`: PILATUS-style stills with Bragg spots, diffuse halos, background and planted truth;
:mod:`.cbf`: the mini-CBF writer they use.
"""
