"""Still or rotation frame, and which sweep, from the header alone (diffractflow.frames) against dxtbx's reading."""
from __future__ import annotations

import shutil

import pytest

from diffractflow.frames import ROTATION, STILL, UNKNOWN, frame_info, name_template


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from stills_processor.synthetic import write_rotation_sequence

    d = tmp_path_factory.mktemp("sweep")
    write_rotation_sequence(d, n_frames=3, osc_deg=0.5, size=256, stem="rot")
    return d


def test_rotation_frames_match_dxtbx_scan(sweep):
    from dxtbx.model.experiment_list import ExperimentListFactory

    files = sorted(sweep.glob("rot_*.cbf"))
    infos = [frame_info(f) for f in files]
    assert all(i.kind == ROTATION for i in infos)
    assert len({i.sweep_key for i in infos}) == 1 and len({i.sweep_id for i in infos}) == 1
    scan = ExperimentListFactory.from_filenames([str(f) for f in files])[0].scan
    for n, (f, info) in enumerate(zip(files, infos)):
        start, width = scan.get_image_oscillation(scan.get_image_range()[0] + n)
        assert info.increment_deg == pytest.approx(width)
        assert info.start_angle_deg == pytest.approx(start)
    assert [i.frame_number for i in infos] == [1, 2, 3]


def test_other_sweep_and_stills_are_told_apart(sweep, tmp_path):
    other = tmp_path / "rot_0001.cbf"  # same name, another directory: another sweep
    shutil.copy(sweep / "rot_0001.cbf", other)
    assert frame_info(other).sweep_key != frame_info(sweep / "rot_0001.cbf").sweep_key
    still = tmp_path / "still_0001.cbf"
    still.write_bytes((sweep / "rot_0001.cbf").read_bytes().replace(b"# Angle_increment 0.5000 deg.",
                                                                     b"# Angle_increment 0.0000 deg."))
    assert frame_info(still).kind == STILL
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    assert frame_info(junk).kind == UNKNOWN
    assert frame_info(tmp_path / "missing.cbf").kind == UNKNOWN


def test_name_template():
    assert name_template("/d/run_00012.cbf") == ("/d/run_#####.cbf", 12)
    assert name_template("/d/image.cbf") == ("/d/image.cbf", None)


def test_compressed_names_and_angles_that_do_not_follow_on(sweep, tmp_path):
    assert name_template("/d/x_0007.cbf.bz2") == ("/d/x_####.cbf.bz2", 7)
    a, b = frame_info(sweep / "rot_0001.cbf"), frame_info(sweep / "rot_0002.cbf")
    assert a.same_sweep(b) and b.same_sweep(a)
    assert a.expected_start_deg(3) == pytest.approx(a.start_angle_deg + 2 * a.increment_deg)
    shifted = tmp_path / "rot_0002.cbf"  # same name pattern in another run: its angles do not follow on
    shifted.write_bytes((sweep / "rot_0002.cbf").read_bytes().replace(
        f"# Start_angle {b.start_angle_deg:.4f} deg.".encode(), f"# Start_angle {b.start_angle_deg + 10:.4f} deg.".encode()))
    moved = frame_info(shifted)
    assert moved.start_angle_deg == pytest.approx(b.start_angle_deg + 10)
    copy = tmp_path / "rot_0001.cbf"
    copy.write_bytes((sweep / "rot_0001.cbf").read_bytes())
    assert frame_info(copy).sweep_key == moved.sweep_key  # same directory and names ...
    assert not frame_info(copy).same_sweep(moved)  # ... but frame 2 does not start where frame 1 ends
