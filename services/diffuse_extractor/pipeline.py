"""Files in, artifacts out: the glue shared by the CLI ``run`` and the bus worker."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from . import artifacts as art
from .core.extract import ExtractionParams, GeometryCache, extract_still
from .core.masks import RunPixelStatistics, untrusted_and_overload


def warm_up() -> None:
    """Load what the first still would otherwise load: the compiled kernels (numba and its modules,
    ~0.5 s) and the artifact writer's imports. A worker calls this when it starts."""
    from diffractflow import artifacts  # noqa: F401  (pydantic etc.)

    from .core import kernels

    kernels.warm_up()


def run_stats(experiments, indices: Sequence[int], path="<experiments>", progress: Callable | None = None):
    """HOT/DEAD flags from the statistics of the given stills (one streaming pass)."""
    stats = None
    for i in indices:
        expt, j = art.select_experiment(experiments, i, path)
        data, fmask = art.read_image(expt, j)
        if stats is None:
            stats = RunPixelStatistics(expt.detector)
        stats.add(data, untrusted_and_overload(expt.detector, data, fmask))
        if progress:
            progress()
    return stats.hot_dead_flags() if stats is not None and stats.n_stills >= 3 else None


def process(expt_path: str | Path, out_dir: str | Path, *, refl_path: str | Path | None = None,
            image_indices: Sequence[int] = (0,), params: ExtractionParams | None = None,
            background_path: str | Path | None = None, hot_dead: bool = True, pngs: bool = True,
            job_id: str | None = None, progress: Callable | None = None) -> list[dict]:
    """Extract each selected still of ``expt_path`` into ``out_dir/<stem>_NNNN.h5`` (+ PNGs).

    Hot/dead pixels need a run: with ``hot_dead`` and >= 3 stills selected they are found from
    the selected stills' statistics first. Returns one summary dict per still.
    """
    from diffractflow.artifacts import sha256_file

    from . import diagnostics

    params = params or ExtractionParams()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    experiments = art.load_experiments(expt_path)
    inputs = {"experiments": sha256_file(expt_path)}
    if refl_path:
        inputs["reflections"] = sha256_file(refl_path)
    background = None
    if background_path:
        background = art.read_background(background_path, experiments[0].detector)
        inputs["background"] = sha256_file(background_path)
    dyn = run_stats(experiments, image_indices, expt_path) if hot_dead and len(image_indices) >= 3 else None
    cache = GeometryCache()
    results = []
    stem = Path(expt_path).stem
    for i in image_indices:
        expt, j = art.select_experiment(experiments, i, expt_path)
        data, fmask = art.read_image(expt, j)
        refl = art.load_reflections(refl_path, experiment_index=i, identifier=expt.identifier) if refl_path else None
        res = extract_still(expt, data, refl, params=params, background=background, dynamic_flags=dyn,
                            format_mask=fmask, geometry_cache=cache, image_index=j)
        image_path = art._image_path(expt, j)
        h5 = out_dir / f"{stem}_{i:04d}.h5"
        art.write_still(h5, res, expt, parameters={**params.as_dict(), "hot_dead": dyn is not None},
                        inputs={**inputs, "image": sha256_file(image_path) if Path(image_path).is_file() else ""},
                        image_path=image_path, image_index=j, experiment_index=i, job_id=job_id,
                        producer_version=__version__, air_path_fraction=params.air_path_fraction,
                        air_density_g_cm3=params.air_density_g_cm3)
        summary = {"index": i, "artifact": h5, "n_pixels": len(res), **{k: v for k, v in res.info.items()
                                                                        if k.startswith("n_")}}
        if pngs:
            summary["pngs"] = diagnostics.write_pngs(out_dir, data, res.flags, res.table, stem=h5.stem)
        results.append(summary)
        del res, data  # frees the table's workspace memory for the next still
        if progress:
            progress()
    return results
