"""Our readers on real detector files (rosettasciio's own test data, ``tests/stem_polar/data/rosettasciio``)
compared with rosettasciio's non-lazy readers: shape, scan shape, dtype and every value (issue 22 item 5)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from stem_polar.artifacts import DataError, open_source

DATA = Path(__file__).parent / "data" / "rosettasciio"
REGISTRY_NAMES = {"Merlin_navigation4x2_ROI.zip": "quantumdetector/Merlin_navigation4x2_ROI.zip",
                  "test1.blo": "blockfile/test1.blo", "Si100_4D.emd": "emd/Si100_4D.emd",
                  "test_00_master.h5": "arina/test_00_master.h5",
                  "test_00_data_000001.h5": "arina/test_00_data_000001.h5", "test_00.h5": "arina/test_00.h5"}


def all_frames(src):
    """Every frame through the source's chunked read, as (n_frames, ky, kx)."""
    n = int(np.prod(src.scan_shape))
    parts = [np.asarray(src.read(a, min(a + 5, n))) for a in range(0, n, 5)]
    return np.concatenate(parts)


def test_files_are_rosettasciios_own_test_data():
    import rsciio

    reg = Path(rsciio.__file__).parent / "tests" / "registry.txt"
    sums = dict(line.replace("'", "").rsplit(maxsplit=1) for line in reg.read_text().splitlines() if line.strip())
    for name, key in REGISTRY_NAMES.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == sums[key], name


@pytest.fixture(scope="module")
def mib_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mib")
    with zipfile.ZipFile(DATA / "Merlin_navigation4x2_ROI.zip") as z:
        z.extractall(d)
    return d


@pytest.mark.parametrize("name, frame", [("001_4x2_6bit.mib", (256, 256)), ("002_4x2_6bit_roi128.mib", (128, 256))])
def test_merlin_mib(mib_dir, name, frame):
    from rsciio.quantumdetector import file_reader

    ref = file_reader(str(mib_dir / name))[0]["data"]
    assert ref.shape == (2, 4) + frame and ref.dtype == np.uint8
    src = open_source(mib_dir / name, None, (2, 4))
    assert src.scan_shape == (2, 4) and tuple(src.frame_shape) == frame and src.dtype == np.uint8
    got = all_frames(src)
    assert got.dtype == np.uint8 and got.sum() > 0
    np.testing.assert_array_equal(got, np.asarray(ref).reshape(8, *frame))
    with pytest.raises(DataError, match="does not match"):
        open_source(mib_dir / name, None, (4, 2))


def test_blockfile(corrcoef):
    from rsciio.blockfile import file_reader

    ref = file_reader(str(DATA / "test1.blo"))[0]["data"]
    src = open_source(DATA / "test1.blo")
    assert src.scan_shape == (3, 2) and tuple(src.frame_shape) == (144, 144) and src.dtype == ref.dtype == np.uint8
    got = all_frames(src)
    np.testing.assert_array_equal(got, np.asarray(ref).reshape(6, 144, 144))
    assert got.std() > 0


def test_prismatic_emd_needs_a_datacube_and_reads_it():
    """Prismatic's EMD holds one 4-D datacube per depth; rosettasciio stacks them into a 5-D signal, so our
    reader asks for --dset (naming the datacubes) and then reads the one given exactly as rosettasciio does."""
    from rsciio.emd import file_reader

    ref = np.asarray(file_reader(str(DATA / "Si100_4D.emd"))[0]["data"])
    assert ref.shape == (2, 11, 11, 8, 8) and ref.dtype == np.float32
    with pytest.raises(DataError, match="CBED_array_depth0000/datacube.*CBED_array_depth0001/datacube"):
        open_source(DATA / "Si100_4D.emd")
    for depth in (0, 1):
        src = open_source(DATA / "Si100_4D.emd", f"4DSTEM_simulation/data/datacubes/CBED_array_depth000{depth}/datacube")
        assert src.scan_shape == (11, 11) and tuple(src.frame_shape) == (8, 8) and src.dtype == np.float32
        np.testing.assert_array_equal(all_frames(src), ref[depth].reshape(121, 8, 8))


def test_dectris_arina_master():
    """The Arina master links its frames from ``test_00_data_000001.h5`` (uint32 on disk). rosettasciio converts
    uint32 to uint16 when no flat field is applied; ours keeps the stored uint32 (no wrap of counts > 65535)."""
    from rsciio.arina import file_reader

    ref = file_reader(str(DATA / "test_00_master.h5"))[0]["data"]
    assert ref.shape == (4, 4, 192, 192) and ref.dtype == np.uint16
    src = open_source(DATA / "test_00_master.h5", None, (4, 4))
    assert src.scan_shape == (4, 4) and tuple(src.frame_shape) == (192, 192)
    assert src.dtype == np.uint32 and "1 data files" in src.name
    got = all_frames(src)
    assert got.dtype == np.uint32 and got.shape == (16, 192, 192)
    np.testing.assert_array_equal(got.astype(np.uint16), np.asarray(ref).reshape(16, 192, 192))
    with pytest.raises(DataError, match="needs --scan-shape"):
        open_source(DATA / "test_00_master.h5")
