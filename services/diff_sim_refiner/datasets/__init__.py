"""Synthetic datasets rendered with the simulator's nanoBragg physics (independent of the extraction code).

:mod:`.stills`: PILATUS-style stills with Bragg spots, diffuse halos, background and planted truth;
:mod:`.sweep`: rotation sweeps rendered the same way; :mod:`.cbf`: the mini-CBF writer they use;
:mod:`.planted`: a dataset's truth dict read back (per-image scale and true orientations, the detector spec) for
judging a run against it; :mod:`.analytic`: an analytic diffuse model (Gaussian halos, a ring) with Bragg peaks,
divided by a per-pixel correction the caller supplies (the stills-processor's indexing cascade test).
"""
