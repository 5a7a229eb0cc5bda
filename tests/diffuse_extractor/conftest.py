"""Fixtures for diffuse-extractor: a synthetic still (in memory) and an indexed thaumatin still."""
from __future__ import annotations

import bz2
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
THAU = REPO.parent / "shared" / "data" / "thaumatin_grid"


@pytest.fixture(scope="session")
def synthetic_still():
    """Two-panel detector (one tilted), P1 crystal, planted diffuse + Bragg peaks, noise-free."""
    from diffuse_extractor import synthetic

    return synthetic.render(synthetic.make_experiment())


@pytest.fixture(scope="session")
def thaumatin_cbfs(tmp_path_factory):
    """Images 1-3 of the thaumatin grid, decompressed into a temporary directory."""
    if not THAU.is_dir():
        pytest.skip(f"team data {THAU} is absent (CI always has it)")
    d = tmp_path_factory.mktemp("thau")
    out = []
    for i in (1, 2, 3):
        p = d / f"thau_3_2_{i:04d}.cbf"
        p.write_bytes(bz2.decompress((THAU / f"thau_3_2_{i:04d}.cbf.bz2").read_bytes()))
        out.append(p)
    return out


@pytest.fixture(scope="session")
def thaumatin_indexed(thaumatin_cbfs, tmp_path_factory):
    """Still 1 imported as a still, spots found and indexed in-process (sequences stills indexer).

    Returns (expt_path, refl_path). Runs once per session (~30 s CPU).
    """
    from dials.command_line.find_spots import do_spotfinding
    from dials.command_line.find_spots import working_phil as fs_phil
    from dials.command_line.index import index
    from dials.command_line.index import working_phil as idx_phil
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model.experiment_list import ExperimentListFactory
    from libtbx.phil import parse

    el = ExperimentListFactory.from_filenames([str(thaumatin_cbfs[0])])
    iset = ImageSetFactory.imageset_from_anyset(el[0].imageset)  # convert_sequences_to_stills
    for j in range(len(iset)):
        iset.set_scan(None, j)
        iset.set_goniometer(None, j)
    el = ExperimentListFactory.from_imageset_and_crystal(iset, None)
    fp = fs_phil.extract()
    fp.spotfinder.mp.nproc = 1
    strong = do_spotfinding(el, fp)
    ip = idx_phil.fetch(parse(
        "indexing.known_symmetry.space_group=P41212\n"
        "indexing.known_symmetry.unit_cell=57.8,57.8,150,90,90,90\n"
        "indexing.stills.indexer=sequences\n")).extract()
    ie, ir = index(el, [strong], ip)
    d = tmp_path_factory.mktemp("thau_idx")
    expt, refl = d / "indexed.expt", d / "indexed.refl"
    ie.as_file(str(expt))
    ir.as_file(str(refl))
    return expt, refl
