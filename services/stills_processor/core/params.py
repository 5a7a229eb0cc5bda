"""DIALS parameters for the two workflows, built from DIALS' own PHIL scopes.

Stills use the master scope of ``dials.stills_process`` (spot finding, indexing, refinement,
integration, profile and prediction in one scope, with that program's stills defaults).
Sequences use the working scopes of ``dials.find_spots``, ``dials.index``, ``dials.refine`` and
``dials.integrate``. ``KEY=VALUE`` overrides (``--phil``) go through libtbx's command-line argument
interpreter, so abbreviated paths work exactly as on DIALS' command lines
(``gain=1.5`` -> ``spotfinder.threshold.dispersion.gain``), and an unknown key is an error.

The job parameters (one pydantic model per job kind: :class:`StillsJob` for ``mode=auto`` and ``run``,
:class:`SequenceJob`, :class:`FrameModelJob`; :data:`JobParams` is their union on ``mode``) are defined here
and only here: the worker validates bus jobs with them, the CLI's options and their defaults are read from
them, and :meth:`StillsJob.settings` turns one into the :class:`ProcessingSettings` the DIALS code takes.

DIALS' own modules (``dials.command_line.*``) are imported inside the functions that parse PHIL: importing
them takes 3-4 s, which ``stills-processor --help``, the orchestration and a parameter check without
``phil`` should not pay (the worker's pool preloads them, see ``_preload.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, List, Literal, Optional, Sequence, Union

from cctbx import sgtbx
from libtbx.utils import Sorry
from pydantic import BaseModel, ConfigDict, Field, RootModel, Tag, field_validator

from diffractflow.params import job_kind

from diffractflow.errors import InputError

# Defaults this service applies on top of dials.stills_process' own (see ../shared/briefs/ENVIRONMENT.md):
# - Debian's cctbx lacks the compiled Nave-model extension used by the default stills indexer,
#   so stills are indexed with the 'sequences' stills indexer;
# - refinement as dials.index does it (detector and beam refined, auto outlier rejection,
#   statistical weights) instead of stills_process' fixed detector: on the thaumatin stills the
#   header distance (351 mm) is ~1.7% long and a fixed detector inflates the cell by ~1.4%;
#   refining it gives a = 57.7, c = 149.6 A as the verified command-line recipe does;
# - at most 5 candidate bases are refined (DIALS default 50): ~4x faster indexing, same solution
#   on these data (raise with --phil indexing.basis_vector_combinations.max_refine=50);
# - DIALS' own multiprocessing is off: the service parallelises over images instead.
STILLS_DEFAULTS: tuple[str, ...] = (
    "indexing.stills.indexer=sequences",
    "indexing.basis_vector_combinations.max_refine=5",
    "refinement.parameterisation.beam.fix=in_spindle_plane+wavelength",
    "refinement.parameterisation.detector.fix=None",
    "refinement.parameterisation.auto_reduction.min_nref_per_parameter=5",
    "refinement.reflections.outlier.algorithm=auto",
    "refinement.reflections.weighting_strategy.override=None",
    "spotfinder.mp.nproc=1",
    "integration.mp.nproc=1",
    "indexing.nproc=1",
)
SEQUENCE_DEFAULTS: tuple[str, ...] = (
    "indexing.basis_vector_combinations.max_refine=5",
    "spotfinder.mp.nproc=1",
    "integration.mp.nproc=1",
    "indexing.nproc=1",
)


@dataclass(frozen=True)
class Strategy:
    """One way of processing a still: DIALS overrides applied after the service defaults and the
    known symmetry (the user's ``--phil`` still wins). ``spots`` says whether it changes spot finding
    (if not, the spots of the first strategy are reused)."""

    name: str
    phil: tuple[str, ...]
    spots: bool
    help: str


# The fallback cascade for a still the first strategy cannot process (issue 16 item 0). Measured on
# rendered P4(3)2(1)2 stills with strong diffuse halos (services/diff_sim_refiner.diffuse_dataset): at
# high dose the dispersion threshold merges halos and neighbouring Bragg spots into blobs with wrong
# centroids (or trips max_strong_pixel_fraction) and indexing finds no lattice; a threshold against the
# resolution-shell statistics (radial_profile) or a stricter sigma_strong separates the Bragg spots again.
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("default", (), False, "the service defaults (dials.stills_process scope, dials.index-style refinement)"),
    Strategy("radial_profile", ("spotfinder.threshold.algorithm=radial_profile",), True,
             "spots above the median + n_iqr x IQR of their resolution shell: a smooth diffuse signal, a water "
             "ring or a high background rise the threshold of the whole shell instead of becoming spots"),
    Strategy("strict_spots", ("spotfinder.threshold.algorithm=dispersion_extended",
                              "spotfinder.threshold.dispersion.sigma_strong=10",
                              "spotfinder.filter.min_spot_size=3"), True,
             "dispersion threshold at 10 sigma (DIALS: 3): only sharp, strong Bragg spots, diffuse blobs dropped"),
    Strategy("fixed_detector", ("refinement.parameterisation.detector.fix=all",
                                "refinement.parameterisation.beam.fix=all"), False,
             "dials.stills_process' refinement: detector and beam from the image header, crystal only"),
    Strategy("dials_index", ("indexing.basis_vector_combinations.max_refine=50",
                             "indexing.method=fft3d"), False,
             "dials.index' own candidate search (50 candidate bases refined, not 5)"),
)}
DEFAULT_STRATEGIES: tuple[str, ...] = tuple(STRATEGIES)


def check_strategies(names: Sequence[str]) -> tuple[str, ...]:
    """Validate strategy names (order kept); raises ValueError naming the unknown one."""
    names = tuple(n.strip() for n in names if n.strip())
    if not names:
        raise ValueError("at least one processing strategy is needed (known: " + ", ".join(STRATEGIES) + ")")
    for n in names:
        if n not in STRATEGIES:
            raise ValueError(f"unknown processing strategy {n!r} (known: {', '.join(STRATEGIES)})")
    return names


class PhilError(InputError):
    """A ``--phil KEY=VALUE`` that no DIALS scope of the workflow understands (bad input: the job is rejected)."""


@dataclass(frozen=True)
class Symmetry:
    """Known crystal symmetry for indexing (both optional)."""

    space_group: str | None = None
    unit_cell: tuple[float, float, float, float, float, float] | None = None

    def phil_lines(self) -> list[str]:
        out = []
        if self.space_group:
            out.append(f"indexing.known_symmetry.space_group={self.space_group.replace(' ', '')}")
        if self.unit_cell:
            out.append("indexing.known_symmetry.unit_cell=" + ",".join(f"{v:g}" for v in self.unit_cell))
        return out


def parse_unit_cell(text: str) -> tuple[float, float, float, float, float, float]:
    """``"a,b,c,al,be,ga"`` (Angstrom, degrees) -> 6 floats; raises ValueError naming the problem."""
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if len(parts) != 6:
        raise ValueError(f"unit cell {text!r} must have 6 numbers a,b,c,alpha,beta,gamma (got {len(parts)})")
    vals = tuple(float(p) for p in parts)
    if min(vals[:3]) <= 0 or not all(0 < v < 180 for v in vals[3:]):
        raise ValueError(f"unit cell {text!r}: lengths must be > 0 Angstrom and angles in (0, 180) degrees")
    return vals  # type: ignore[return-value]


def check_space_group(symbol: str) -> str:
    """Validate a space-group symbol with cctbx; returns its Hermann-Mauguin form."""
    try:
        info = sgtbx.space_group_info(symbol)
    except RuntimeError as exc:
        raise ValueError(f"unknown space group {symbol!r}: {exc}") from None
    return str(info)


def _interpret(master, args: Sequence[str]):
    """Parse KEY=VALUE lines against ``master``; returns (sources, unknown_args)."""
    interp = master.command_line_argument_interpreter(home_scope="")
    sources, unknown = [], []
    for arg in args:
        if "=" not in arg:
            raise PhilError(f"--phil {arg!r} is not of the form KEY=VALUE")
        try:
            sources.append(interp.process(arg=arg))
        except Sorry as exc:
            if "Unknown command line parameter" in str(exc) or "unknown" in str(exc).lower():
                unknown.append(arg)
            else:
                raise PhilError(f"--phil {arg!r}: {exc}") from None
    return sources, unknown


def stills_params(settings: ProcessingSettings, strategy: str = "default"):
    """The working ``dials.stills_process`` parameters (a scope_extract) for one still and strategy."""
    # DIALS (1-2 s) only when parameters are built: the CLI and the worker's params model load without it
    from dials.command_line.stills_process import phil_scope

    user = list(settings.phil)
    args = list(STILLS_DEFAULTS) + settings.symmetry.phil_lines() + list(STRATEGIES[strategy].phil) + user
    sources, _unknown = _interpret(phil_scope, args)  # sequence-only keys are skipped here
    return phil_scope.fetch(sources=sources).extract()


def _stills_unknown(args: Sequence[str]) -> list[str]:
    # DIALS only when phil arguments are checked (see stills_params)
    from dials.command_line.stills_process import phil_scope

    return _interpret(phil_scope, args)[1]


@dataclass
class SequenceParams:
    """One scope_extract per DIALS program of the rotation workflow."""

    find_spots: object
    index: object
    refine: object
    integrate: object


def sequence_params(settings: ProcessingSettings) -> SequenceParams:
    """Working parameters of dials.find_spots / index / refine / integrate for one sequence.

    Each KEY=VALUE is applied to every program scope that has it (stills-only keys are skipped).
    """
    # DIALS only when parameters are built (see stills_params)
    from dials.command_line import find_spots, index, integrate, refine

    scopes = {
        "find_spots": find_spots.working_phil,
        "index": index.working_phil,
        "refine": refine.working_phil,
        "integrate": integrate.working_phil,
    }
    args = list(SEQUENCE_DEFAULTS) + settings.symmetry.phil_lines() + list(settings.phil)
    extracts = {name: scope.fetch(sources=_interpret(scope, args)[0]).extract() for name, scope in scopes.items()}
    return SequenceParams(**extracts)


def _sequence_unknown(args: Sequence[str]) -> list[str]:
    # DIALS only when phil arguments are checked (see stills_params)
    from dials.command_line import find_spots, index, integrate, refine

    unknown = set(args)
    for scope in (find_spots.working_phil, index.working_phil, refine.working_phil, integrate.working_phil):
        unknown &= set(_interpret(scope, args)[1])
    return [a for a in args if a in unknown]


def validate_phil(settings: ProcessingSettings) -> None:
    """Fail early, before any image is read, on an override that neither workflow knows."""
    args = list(settings.phil)
    bad = sorted(set(_stills_unknown(args)) & set(_sequence_unknown(args)), key=args.index)
    if bad:
        raise PhilError(f"--phil {bad[0]!r} is not a DIALS parameter of the stills or sequence workflow")


# ------------------------------------------------------------------------------ job parameter models
_STRICT = ConfigDict(extra="forbid")


class _Symmetric(BaseModel):
    """Fields every job kind that runs DIALS indexing shares (known symmetry, DIALS overrides, validation)."""

    model_config = _STRICT

    space_group: Optional[str] = Field(None, description="known space group for indexing, e.g. P41212 (any "
                                       "symbol cctbx reads; none: DIALS finds the lattice)")
    unit_cell: Optional[List[float]] = Field(None, min_length=6, max_length=6, description="known cell a,b,c "
                                             "(Angstrom, > 0), alpha,beta,gamma (deg, in (0, 180)); a list or "
                                             "the text 'a,b,c,al,be,ga'")
    phil: List[str] = Field(default_factory=list, description="DIALS parameters KEY=VALUE (abbreviated paths "
                            "as on DIALS' command lines), applied after the service's defaults")
    nproc: int = Field(0, ge=0, le=256, description="worker processes, each keeping DIALS loaded (0 = all CPUs "
                       "this process may use; a rotation sequence always takes one)")
    min_spots: int = Field(16, ge=1, description="fewer strong spots than this: reported as a non-hit, "
                           "not indexed (count, >= 1)")
    q_tolerance: float = Field(0.005, gt=0, description="validation bound on the median |q_obs - q_pred| of the "
                               "indexed spots (1/Angstrom, > 0)")
    px_tolerance: float = Field(2.0, gt=0, description="validation bound on the median detector offset "
                                "observed - predicted (pixels, > 0)")

    @field_validator("space_group")
    @classmethod
    def _sg(cls, v):
        return None if v is None else check_space_group(v)

    @field_validator("unit_cell", mode="before")
    @classmethod
    def _uc(cls, v):
        if v is None:
            return v
        text = v if isinstance(v, str) else ",".join(str(x) for x in v)
        return list(parse_unit_cell(text))

    @field_validator("phil")
    @classmethod
    def _phil(cls, v):
        if v:  # parsing against DIALS' scopes costs the DIALS import: only when there is something to parse
            validate_phil(ProcessingSettings(phil=tuple(v)))
        return v

    def _symmetry(self) -> "Symmetry":
        return Symmetry(self.space_group, tuple(self.unit_cell) if self.unit_cell else None)


class StillsJob(_Symmetric):
    """``mode=auto`` (and ``stills-processor run``): images routed as stills (one by one, the strategy cascade)
    or, for oscillation frames, grouped into rotation sequences."""

    mode: Literal["auto"] = Field("auto", description="route the images: stills one by one, oscillation frames "
                                  "grouped into sequences")
    strategies: Optional[List[str]] = Field(None, description="processing strategies tried in order on a still "
                                            "until one indexes it; a list or comma-separated text (none: all, "
                                            + ",".join(DEFAULT_STRATEGIES) + ")")
    relaxed_sigma_b: float = Field(0.5, ge=0, description="a still whose profile sigma_b exceeds DIALS' 0.1 deg "
                                   "cut-off is still integrated below this (deg, >= 0; 0 = no relaxation)")
    scan_varying: Optional[bool] = Field(None, description="rotation sequences: true refines static then "
                                         "scan-varying, false scan-static only (none: dials.refine's own "
                                         "default, static then scan-varying)")
    integrate: bool = Field(True, description="rotation sequences: integrate the Bragg reflections (false stops "
                            "after refinement; stills always integrate)")

    @field_validator("strategies", mode="before")
    @classmethod
    def _strategies(cls, v):
        if v is None:
            return v
        return list(check_strategies(v.split(",") if isinstance(v, str) else v))

    def settings(self) -> "ProcessingSettings":
        return ProcessingSettings(
            symmetry=self._symmetry(), phil=tuple(self.phil), min_spots=self.min_spots,
            q_tolerance=self.q_tolerance, px_tolerance=self.px_tolerance,
            strategies=tuple(self.strategies) if self.strategies else DEFAULT_STRATEGIES,
            relaxed_sigma_b_cutoff=self.relaxed_sigma_b or None, scan_varying=self.scan_varying,
            integrate_sequences=self.integrate)


class SequenceJob(_Symmetric):
    """``mode=sequence``: the images are the frames of ONE rotation sweep (possibly only its first frames),
    indexed and refined as one DIALS sequence."""

    mode: Literal["sequence"] = Field(description="the images are the frames of one rotation sweep")
    scan_varying: bool = Field(False, description="refine static, then with a scan-varying crystal/beam "
                               "(dials.refine's default for sequences); false: scan-static only")
    integrate: bool = Field(False, description="also integrate the Bragg reflections (not needed for diffuse "
                            "extraction)")

    def settings(self) -> "ProcessingSettings":
        return ProcessingSettings(
            symmetry=self._symmetry(), phil=tuple(self.phil), min_spots=self.min_spots,
            q_tolerance=self.q_tolerance, px_tolerance=self.px_tolerance, scan_varying=self.scan_varying,
            integrate_sequences=self.integrate)


class FrameModelJob(BaseModel):
    """``mode=frame_model``: a one-image rotation experiment for input ``image0`` from the sweep model given as
    input ``model``; no spot finding, nothing to tune."""

    model_config = _STRICT

    mode: Literal["frame_model"] = Field(description="a one-image rotation experiment from a sweep model")


class JobParams(RootModel):
    """A stills-processor job's parameters: the model of its ``mode`` (default ``auto``); ``.root`` is it."""

    root: Annotated[Union[Annotated[StillsJob, Tag("auto")], Annotated[SequenceJob, Tag("sequence")],
                          Annotated[FrameModelJob, Tag("frame_model")]],
                    job_kind("mode", "auto", "auto", "sequence", "frame_model")]


def field_default(model: type[BaseModel], name: str) -> Any:
    """The default of one field of ``model`` (the one place it is written)."""
    return model.model_fields[name].get_default(call_default_factory=True)


def field_help(model: type[BaseModel], name: str) -> str:
    """The description of one field, as a sentence for a command line's ``--help``."""
    d = model.model_fields[name].description or ""
    return d[:1].upper() + d[1:] + "."


@dataclass(frozen=True)
class ProcessingSettings:
    """Everything a worker needs to process one unit (picklable: plain data only)."""

    symmetry: Symmetry = field(default_factory=Symmetry)
    phil: tuple[str, ...] = ()
    # the defaults are the job model's (see StillsJob for units and meaning)
    min_spots: int = field_default(StillsJob, "min_spots")
    q_tolerance: float = field_default(StillsJob, "q_tolerance")
    px_tolerance: float = field_default(StillsJob, "px_tolerance")
    write_indexed: bool = True  # also write <name>_indexed.refl (strong spots with Miller indices)
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES  # tried in order on a still until one processes it
    relaxed_sigma_b_cutoff: float | None = field_default(StillsJob, "relaxed_sigma_b")  # deg; None: DIALS' is final
    # rotation sequences only: None = dials.refine's default (static, then a scan-varying macrocycle);
    # True = the same, asked for explicitly; False = scan-static refinement only
    scan_varying: bool | None = field_default(StillsJob, "scan_varying")
    integrate_sequences: bool = field_default(StillsJob, "integrate")  # False: a sequence stops after refinement
