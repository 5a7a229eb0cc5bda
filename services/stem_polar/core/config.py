"""Run configuration: every key of the seed's ``config.yaml`` plus the service's extensions.

Unknown keys are rejected (``extra='forbid'``) so a typo in a config file is an error, not a silent default.
Defaults are the values shown in the seed's example configuration, except: the radial ROIs (they depend on the
detector size and are off unless given), ``dpc.baseline: median`` (the seed's ``rowcol`` erases stripe-domain
fields) and ``matched_filter.softmax_temp: auto`` (the seed's 2.0 saturates the confidence map) (issue 22).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_roi(v):
    if v is None:
        return v
    if len(v) != 2 or not (0 <= v[0] < v[1]):
        raise ValueError(f"radial ROI must be [inner, outer] with 0 <= inner < outer (pixels), got {v}")
    return v


class TemplatesConfig(_Section):
    top_percent: float = Field(10.0, gt=0, le=100, description="keep the top X % of template values in a gate")
    smooth_sigma: Optional[float] = Field(1.5, ge=0, description="Gaussian smoothing of gates (detector px); 0/null = off")
    roi_r: Optional[list[float]] = Field(None, description="radial band [inner, outer] of gates (detector px from centre)")
    eps: float = Field(1e-6, gt=0, description="epsilon in (sigma + eps)")
    symmetrize: Literal["beam", "array", "none"] = Field(
        "beam", description="gate symmetrisation: point reflection about the (sub-pixel) beam centre; 'array' = "
        "the seed's literal G[::-1, ::-1] (biased when the beam is not at the array centre)")

    @field_validator("roi_r")
    @classmethod
    def _v_roi(cls, v):
        return _check_roi(v)


class PreprocessConfig(_Section):
    log_transform: bool = True
    background_subtract: bool = True
    central_mask_px: float = Field(8.0, ge=0, description="radius (detector px) of the masked central beam; 0 = off")
    whiten: Literal["none", "diag"] = "diag"


class MatchedFilterConfig(_Section):
    softmax_temp: Union[float, Literal["auto"]] = Field(
        "auto", description="softmax temperature; 'auto' = the standard deviation of the scores S (the seed's "
        "fixed 2.0 saturates the confidence at ~1 for typical score scales)")

    @field_validator("softmax_temp")
    @classmethod
    def _v_temp(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError(f"softmax_temp must be > 0 or 'auto', got {v}")
        return v


class DPCConfig(_Section):
    gate_mode: Literal["union", "adaptive"] = "adaptive"
    baseline: Literal["median", "rowcol", "roi", "none"] = Field(
        "median", description="the seed's example uses 'rowcol', which erases fields of stripe domains along the "
        "scan axes (the quality report warns); 'median' removes only a global offset")
    roi: Optional[list[float]] = Field(None, description="radial ROI [inner, outer] for CoM (detector px from centre)")
    baseline_roi: Optional[list[int]] = Field(
        None, description="real-space reference (vacuum) region [y0, y1, x0, x1] (scan px) for baseline 'roi'"
    )
    field_scale: float = Field(1.0, description="alpha in E = -alpha * C (the electron is deflected against E)")

    @field_validator("roi")
    @classmethod
    def _v_roi(cls, v):
        return _check_roi(v)

    @field_validator("baseline_roi")
    @classmethod
    def _v_broi(cls, v):
        if v is not None and (len(v) != 4 or v[0] >= v[1] or v[2] >= v[3] or min(v) < 0):
            raise ValueError(f"baseline_roi must be [y0, y1, x0, x1] with y0 < y1, x0 < x1, got {v}")
        return v

    @model_validator(mode="after")
    def _roi_needed(self):
        if self.baseline == "roi" and self.baseline_roi is None:
            raise ValueError("dpc.baseline 'roi' needs dpc.baseline_roi = [y0, y1, x0, x1] (a vacuum region, scan px)")
        return self


class CalibrationConfig(_Section):
    center_y: Optional[float] = None
    center_x: Optional[float] = None
    pixel_size: Optional[float] = Field(None, gt=0, description="real-space scan step (see pixel_size_units)")
    pixel_size_units: Literal["nm", "angstrom"] = "nm"
    pixel_size_k: float = Field(1.0, gt=0, description="k-space size of a detector pixel (1/Å or relative)")
    pixel_size_ky: Optional[float] = Field(None, gt=0)
    pixel_size_kx: Optional[float] = Field(None, gt=0)
    k_units: str = Field("relative", description="'1/Å' after absolute calibration, else 'relative'")
    convergence_angle: Optional[float] = Field(None, gt=0, description="probe semi-angle (mrad); logged, and "
                                               "used for mrad/px when physical units are asked for")
    center_sample_frames: int = Field(1024, ge=1, description="frames read for automatic centre detection")

    @property
    def ky(self) -> float:
        return self.pixel_size_ky if self.pixel_size_ky is not None else self.pixel_size_k

    @property
    def kx(self) -> float:
        return self.pixel_size_kx if self.pixel_size_kx is not None else self.pixel_size_k

    @property
    def scan_step_nm(self) -> Optional[float]:
        if self.pixel_size is None:
            return None
        return self.pixel_size * (0.1 if self.pixel_size_units == "angstrom" else 1.0)


class ValidationConfig(_Section):
    enable_split_half: bool = False
    split_seed: int = 0
    ssim_warn: float = Field(0.5, description="warn below this split-half SSIM (templates and field maps)")
    baseline_removed_warn: float = Field(0.5, ge=0, le=1, description="warn when the DPC baseline removes more "
                                         "than this fraction of the CoM field variance")
    gate_bias_warn_px: float = Field(0.2, gt=0, description="warn when a CoM gate shifts a deflection-free "
                                     "pattern by more (detector px)")
    center_offset_warn_px: float = Field(1.0, gt=0, description="warn when the mean pattern's CoM is further "
                                         "from the beam centre used (detector px)")
    confidence_saturated: float = Field(0.98, gt=0, le=1, description="warn when the mean confidence is above")
    confidence_flat_margin: float = Field(0.05, ge=0, description="warn when the mean confidence is within this "
                                          "of chance (1 / clusters)")
    gate_signal_warn: float = Field(0.5, ge=0, le=1, description="warn when a gate holds less than this fraction "
                                    "of its template's positive energy")


class ClustersConfig(_Section):
    ids: Optional[list[int]] = Field(None, description="declared cluster ids; declared ids without members are skipped")
    min_count: int = Field(1, ge=1, description="clusters with fewer members are reported as empty and skipped")
    ignore_negative: bool = Field(True, description="labels < 0 mean 'unassigned' (noise) and form no cluster")


class ScanConfig(_Section):
    rotation_deg: Union[float, Literal["auto"]] = Field(
        0.0, description="detector-to-scan rotation (deg, counter-clockwise), or 'auto' (minimum curl of CoM)")
    flip: Union[bool, Literal["auto"]] = Field(False, description="mirror detector x before rotating, or 'auto'")


class DescanConfig(_Section):
    fit: Literal["none", "plane"] = Field("plane", description="model of the reference CoM: raw per position or a plane")


class PhysicalConfig(_Section):
    enabled: bool = False
    accelerating_voltage_kv: float = Field(300.0, gt=0)
    thickness_nm: Optional[float] = Field(None, gt=0)
    mrad_per_px: Optional[float] = Field(None, gt=0, description="detector angular pixel size; else from "
                                         "convergence_angle / BF disk radius, or from an absolute k calibration")

    @model_validator(mode="after")
    def _need_t(self):
        if self.enabled and self.thickness_nm is None:
            raise ValueError("physical.enabled needs physical.thickness_nm (specimen thickness, nm)")
        return self


class AutoLabelConfig(_Section):
    n_clusters: int = Field(4, ge=2)
    n_components: int = Field(8, ge=1)
    bin: int = Field(4, ge=1, description="detector binning before PCA")
    seed: int = 0


class PolarConfig(_Section):
    templates: TemplatesConfig = TemplatesConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    matched_filter: MatchedFilterConfig = MatchedFilterConfig()
    dpc: DPCConfig = DPCConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    validation: ValidationConfig = ValidationConfig()
    clusters: ClustersConfig = ClustersConfig()
    scan: ScanConfig = ScanConfig()
    descan: DescanConfig = DescanConfig()
    physical: PhysicalConfig = PhysicalConfig()
    autolabel: AutoLabelConfig = AutoLabelConfig()
    icom: bool = True

    def to_yaml_dict(self) -> dict:
        return self.model_dump(mode="json")


def load_config(path: Optional[str | Path] = None, overrides: Optional[dict] = None) -> PolarConfig:
    """Read a YAML config (sections as in the seed) and apply nested ``overrides``."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {p}: top level must be a mapping of sections")
        data = loaded
    if overrides:
        data = _deep_merge(data, overrides)
    return PolarConfig.model_validate(data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
