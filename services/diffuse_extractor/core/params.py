"""The diffuse-extractor's parameters: one pydantic model per job kind, the only place their defaults are written.

- :class:`MaskParams`: what every job masks (beamstop, user shapes) and the detector gain;
- :class:`ExtractionParams`: the knobs of one extraction (``core.extract.extract_still``), a superset of
  :class:`MaskParams`;
- :class:`ExtractJob` (bus ``mode="extract"``, the default; ``diffuse-extractor run``): an extraction plus which
  stills of the ``.expt`` and the run-level options (pixel statistics, PNGs);
- :class:`BackgroundJob` (bus ``mode="background"``; ``diffuse-extractor background``): a smooth background from
  background-only frames.

The bus worker validates a job's ``params`` with :data:`ExtractorParams` (``mode`` picks the kind), the CLI builds
its options from the same fields and the library takes :class:`ExtractionParams`. Unknown keys are refused
(``extra="forbid"``). Mask shapes are written ``circle:PANEL:X,Y,R`` or ``polygon:PANEL:X1,Y1,X2,Y2,...``
(pixels) and parsed into :class:`~diffuse_extractor.core.masks.Shape` on validation.
"""
from __future__ import annotations

from typing import Annotated, Any, List, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, RootModel, Tag, field_serializer,
                      field_validator)

from diffractflow.params import job_kind

from .corrections import DRY_AIR_DENSITY_G_CM3
from .masks import Shape


def _shape_text(s: Shape) -> str:
    return f"{s.kind}:{s.panel}:" + ",".join(f"{c:g}" for c in s.coords)


def _parse_shapes(v: Any) -> list[Shape]:
    return [s if isinstance(s, Shape) else Shape.parse(str(s)) for s in (v or [])]


class MaskParams(BaseModel):
    """Masks every job applies, and the detector gain."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    gain: float = Field(1.0, gt=0, description="detector gain, ADU per photon (> 0), for counting statistics")
    beamstop: Union[Literal["auto", "none"], List[Shape]] = Field(
        "auto", description="'auto' (found in the image), 'none', or shapes circle:PANEL:X,Y,R / "
        "polygon:PANEL:X1,Y1,X2,Y2,... (pixels) for disk and arm")
    detect_arm: bool = Field(True, description="with beamstop='auto': also look for the beamstop arm")
    beamstop_ratio: float = Field(0.5, gt=0, lt=1, description="with beamstop='auto': pixels below this fraction "
                                  "of the expected level near the beam are beamstop shadow (0..1)")
    mask_shapes: List[Shape] = Field(default_factory=list, description="extra user mask shapes (same syntax as "
                                     "beamstop)")

    @field_validator("beamstop", mode="before")
    @classmethod
    def _beamstop(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v.lower() in ("auto", "none"):
                return v.lower()
            return [Shape.parse(v)]
        return _parse_shapes(v)

    @field_validator("mask_shapes", mode="before")
    @classmethod
    def _shapes(cls, v: Any) -> list[Shape]:
        return _parse_shapes([v] if isinstance(v, str) else v)

    @field_serializer("beamstop")
    def _beamstop_text(self, v):
        return v if isinstance(v, str) else [_shape_text(s) for s in v]

    @field_serializer("mask_shapes")
    def _shapes_text(self, v):
        return [_shape_text(s) for s in v]

    def as_dict(self) -> dict:
        """JSON-ready values (shapes as text), e.g. for an artifact's provenance."""
        return self.model_dump(mode="json")


class ExtractionParams(MaskParams):
    """Knobs of one extraction (:func:`diffuse_extractor.core.extract.extract_still`)."""

    bragg_radius_px: Optional[float] = Field(None, gt=0, description="Bragg-mask disk radius, pixels (> 0; "
                                             "default: from the spot profile)")
    d_min: Optional[float] = Field(None, gt=0, description="extract only the pixels to this resolution, Å (> 0; "
                                   "|q| <= 1/d_min; the rest are flagged RESOLUTION and skipped: a run's map stops "
                                   "at its d_min anyway). None: the whole detector")
    bragg_d_min: Optional[float] = Field(None, gt=0, description="predict Bragg spots to this resolution, Å "
                                         "(default: 0.9 d_min with d_min, so spots just beyond it are masked where "
                                         "their disks reach inside; else the detector's corner)")
    bragg_delpsi_max: float = Field(0.01, gt=0, le=0.1, description="predicted-reflection window |Δψ|, rad "
                                    "(0..0.1; DIALS' stills prediction keeps 0.0015). Wide enough for the mosaic "
                                    "band (half-mosaicity + d/domain size): a partial outside it is masked only "
                                    "where the outlier test sees it, which depends on the dose")
    outlier_nsigma: Optional[float] = Field(8.0, gt=0, description="mask unpredicted bright pixels this many "
                                            "Poisson σ above their |q| shell and their neighbourhood (> 0; None: off)")
    outlier_grow_px: float = Field(2.0, ge=0, description="grow each outlier mask by this many pixels (>= 0)")
    use_observed_spots: bool = Field(True, description="also mask the bounding boxes of the observed (DIALS) spots")
    air_path_fraction: float = Field(1.0, ge=0, le=1, description="fraction of the sample-to-pixel path in air "
                                     "(0 = vacuum or helium, 1 = all air)")
    air_density_g_cm3: float = Field(DRY_AIR_DENSITY_G_CM3, gt=0, description="air density, g/cm³ (> 0; default: "
                                     "dry air at 20 °C, 1 atm)")
    background_scale: float = Field(1.0, ge=0, description="extra multiplier of the subtracted background (>= 0; "
                                    "an image background: e.g. the exposure ratio)")
    lorentz: bool = Field(False, description="rotation frames: apply DIALS' Lorentz factor. Off: it belongs to "
                          "integrated Bragg intensities, diffuse pixels need none (as in mdx2); stills never get one")
    isotropic_background: bool = Field(False, description="subtract the per-still isotropic background B(|q|) "
                                       "fitted to the still's own unmasked pixels (always computed and reported; "
                                       "it also removes the isotropic part of the diffuse signal)")


class ExtractJob(ExtractionParams):
    """One extraction job: inputs ``experiments`` (.expt) [+ ``reflections``, ``background``] -> one HDF5 per
    selected still (``diffuse-extractor run``; bus ``mode="extract"``)."""

    mode: Literal["extract"] = Field("extract", description="job kind")
    image_indices: List[int] = Field(default_factory=lambda: [0], description="experiment (still) indices in "
                                     "the .expt")
    all_images: bool = Field(False, description="process every experiment in the .expt")
    hot_dead: bool = Field(True, description="mask hot/dead pixels found from the run's (or the job's) per-pixel "
                           "statistics (needs >= pixel_stats_min_stills stills)")
    pixel_stats: Optional[str] = Field(None, description="the run's running pixel-statistics file, relative to the "
                                       "volume root (e.g. runs/RUN/pixel_stats.h5): each still is added to it")
    pixel_stats_min_stills: int = Field(3, ge=2, description="hot/dead masking from this many stills in the "
                                        "statistics on (>= 2)")
    beamstop_record: Optional[str] = Field(None, description="with beamstop='auto': the run's beamstop record, "
                                           "relative to the volume root (e.g. runs/RUN/beamstop.npz); the run's "
                                           "first still to get there finds the shadow and records it (under a "
                                           "lock), every other still of the run, in any process, uses it")
    beamstop_per_run: bool = Field(True, description="with beamstop='auto': the beamstop found in a run's first "
                                   "still (on this worker) serves the run's later stills; False searches every still")
    pngs: bool = Field(True, description="write diagnostic PNGs (raw, masks, corrected, radial profile)")


class BackgroundJob(MaskParams):
    """A smooth background from background-only frames: inputs ``frame0``, ``frame1``, ... -> ``background``
    (``diffuse-extractor background``; bus ``mode="background"``)."""

    mode: Literal["background"] = Field("background", description="job kind")
    bin_px: int = Field(8, ge=1, le=256, description="bin size, pixels (bin_px x bin_px), 1..256")
    smooth_bins: float = Field(0.5, ge=0, le=50, description="Gaussian smoothing σ, bins (0 = none)")
    outlier_nsigma: float = Field(6.0, gt=0, description="drop zingers and hot pixels this many Poisson σ above "
                                  "the median / the smooth background (> 0)")
    beamstop_record: Optional[str] = Field(None, description="with beamstop='auto': write the run's beamstop "
                                           "record (relative to the volume root, e.g. runs/RUN/beamstop.npz) from "
                                           "the shadow on the mean frame, for every extraction of the run to use")


class ExtractorParams(RootModel):
    """A diffuse-extractor job's ``params``: :class:`ExtractJob` or :class:`BackgroundJob` by ``mode`` (default
    extract). The worker's ``params_model``; the job kind's model is ``.root``."""

    root: Annotated[Union[Annotated[ExtractJob, Tag("extract")], Annotated[BackgroundJob, Tag("background")]],
                    job_kind("mode", "extract", "extract", "background")]


def extraction_params(job: MaskParams) -> ExtractionParams:
    """The extraction knobs a job carries (an :class:`ExtractJob`'s, or a :class:`BackgroundJob`'s masks with the
    other knobs at their defaults), without its job-level fields."""
    shared = ExtractionParams.model_fields if isinstance(job, ExtractionParams) else MaskParams.model_fields
    return ExtractionParams(**{k: getattr(job, k) for k in shared})


__all__ = ["MaskParams", "ExtractionParams", "ExtractJob", "BackgroundJob", "ExtractorParams", "extraction_params"]
