"""DIALS parameters for the two workflows, built from DIALS' own PHIL scopes.

Stills use the master scope of ``dials.stills_process`` (spot finding, indexing, refinement,
integration, profile and prediction in one scope, with that program's stills defaults).
Sequences use the working scopes of ``dials.find_spots``, ``dials.index``, ``dials.refine`` and
``dials.integrate``. ``KEY=VALUE`` overrides (``--phil``) go through libtbx's command-line argument
interpreter, so abbreviated paths work exactly as on DIALS' command lines
(``gain=1.5`` -> ``spotfinder.threshold.dispersion.gain``), and an unknown key is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

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
RELAXED_SIGMA_B_CUTOFF = 0.5  # deg; a still rejected by DIALS' 0.1 deg is integrated if sigma_b is below this


def check_strategies(names: Sequence[str]) -> tuple[str, ...]:
    """Validate strategy names (order kept); raises ValueError naming the unknown one."""
    names = tuple(n.strip() for n in names if n.strip())
    if not names:
        raise ValueError("at least one processing strategy is needed (known: " + ", ".join(STRATEGIES) + ")")
    for n in names:
        if n not in STRATEGIES:
            raise ValueError(f"unknown processing strategy {n!r} (known: {', '.join(STRATEGIES)})")
    return names


class PhilError(ValueError):
    """A ``--phil KEY=VALUE`` that no DIALS scope of the workflow understands."""


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


@dataclass(frozen=True)
class ProcessingSettings:
    """Everything a worker needs to process one unit (picklable: plain data only)."""

    symmetry: Symmetry = field(default_factory=Symmetry)
    phil: tuple[str, ...] = ()
    min_spots: int = 16  # fewer strong spots than this: a non-hit (as dials.stills_process' hit finder)
    q_tolerance: float = 0.005  # 1/Angstrom, bound on the median |q_obs - q_pred| of indexed spots
    px_tolerance: float = 2.0  # pixels, bound on the median detector offset observed vs predicted
    write_indexed: bool = True  # also write <name>_indexed.refl (strong spots with Miller indices)
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES  # tried in order on a still until one processes it
    relaxed_sigma_b_cutoff: float | None = RELAXED_SIGMA_B_CUTOFF  # deg; None: DIALS' cut-off is final
    # rotation sequences only: None = dials.refine's default (static, then a scan-varying macrocycle);
    # True = the same, asked for explicitly; False = scan-static refinement only
    scan_varying: bool | None = None
    integrate_sequences: bool = True  # False: a sequence stops after refinement (indexed, not integrated)


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
    from cctbx import sgtbx

    try:
        info = sgtbx.space_group_info(symbol)
    except RuntimeError as exc:
        raise ValueError(f"unknown space group {symbol!r}: {exc}") from None
    return str(info)


def _interpret(master, args: Sequence[str]):
    """Parse KEY=VALUE lines against ``master``; returns (sources, unknown_args)."""
    from libtbx.utils import Sorry

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
    from dials.command_line.stills_process import phil_scope

    user = list(settings.phil)
    args = list(STILLS_DEFAULTS) + settings.symmetry.phil_lines() + list(STRATEGIES[strategy].phil) + user
    sources, _unknown = _interpret(phil_scope, args)  # sequence-only keys are skipped here
    return phil_scope.fetch(sources=sources).extract()


def _stills_unknown(args: Sequence[str]) -> list[str]:
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
