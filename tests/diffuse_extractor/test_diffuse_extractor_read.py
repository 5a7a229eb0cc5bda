"""Reading a still: the untrusted/overload flags from ``read_image``'s static mask equal those from dxtbx's full
``ImageSet.get_mask`` (which decodes the image a second time for the trusted range), with and without an
external mask."""
from __future__ import annotations

import numpy as np

from diffuse_extractor.artifacts import read_image
from diffuse_extractor.core.masks import MaskBit, untrusted_and_overload


def _dxtbx_flags(expt):
    """The flags as made from dxtbx's own mask (trusted range, rectangles, external mask), overloads kept good."""
    iset = expt.imageset
    raw = [r.as_numpy_array() for r in (iset.get_raw_data(0) if isinstance(iset.get_raw_data(0), tuple)
                                        else (iset.get_raw_data(0),))]
    mask = [m.as_numpy_array() for m in iset.get_mask(0)]
    fm = [m | (d >= p.get_trusted_range()[1]) for m, d, p in zip(mask, raw, expt.detector)]
    return untrusted_and_overload(expt.detector, [d.astype(np.float32) for d in raw], fm), mask


def test_read_image_flags_equal_dxtbx_mask_on_pilatus(thaumatin_cbfs):
    from dxtbx.model.experiment_list import ExperimentListFactory

    expt = ExperimentListFactory.from_filenames([str(thaumatin_cbfs[1])])[0]
    data, fmask = read_image(expt, 0)
    assert data[0].dtype == np.float32 and data[0].shape == (2527, 2463)
    ref, mask = _dxtbx_flags(expt)
    mine = untrusted_and_overload(expt.detector, data, fmask)
    np.testing.assert_array_equal(mine[0], ref[0])
    assert ((mine[0] & MaskBit.UNTRUSTED) != 0).sum() > 500_000  # the module gaps (-1 in the CBF)
    hi = expt.detector[0].get_trusted_range()[1]
    # dxtbx's masked pixels: untrusted here, or overloaded (flagged as such, not as untrusted)
    assert ((mine[0] & MaskBit.UNTRUSTED) != 0).sum() == (~mask[0] & (data[0] < hi)).sum()
    assert ((mine[0] & MaskBit.OVERLOAD) != 0).sum() == (data[0] >= hi).sum()


def test_read_image_keeps_an_external_mask(thaumatin_cbfs):
    from dxtbx.format.image import ImageBool
    from dxtbx.model.experiment_list import ExperimentListFactory

    expt = ExperimentListFactory.from_filenames([str(thaumatin_cbfs[2])])[0]
    ny, nx = 2527, 2463
    ext = np.ones((ny, nx), bool)
    ext[100:180, 1200:1300] = False  # a user mask over live pixels
    expt.imageset.external_lookup.mask.data = ImageBool(_flex_bool(ext))
    data, fmask = read_image(expt, 0)
    ref, _ = _dxtbx_flags(expt)
    mine = untrusted_and_overload(expt.detector, data, fmask)
    np.testing.assert_array_equal(mine[0], ref[0])
    assert (mine[0][100:180, 1200:1300] & MaskBit.UNTRUSTED).all()
    assert (data[0][100:180, 1200:1300] >= 0).mean() > 0.99  # live pixels: flagged for the external mask alone


def _flex_bool(a):
    from scitbx.array_family import flex

    f = flex.bool(a.ravel().tolist())
    f.reshape(flex.grid(*a.shape))
    return f
