"""Seed 001's refinement demo: recover mosaic spread and misset angles of a synthetic crystal.

Ground truth mosaic 0.8 deg, misset (5, 3, -2) deg; start 0.2 deg and (0, 0, 0); cubic 100 A
cell, 5x5x5 cells, default_F 100, 5 mosaic domains with seed 42 (nanoBragg's domain sampling: the
domain rotation angles are the spread tensor times fixed factors, so d/d(spread) is exact);
64x64 pixels of 0.1 mm at 100 mm; 1 A beam of fluence 1e28 photons/m^2.  MSE loss, float64.

The seed's Adam loop (lr 0.05 deg) runs ``adam_iterations`` steps, then an L-BFGS polish finishes the
descent (Adam alone at lr 0.05 needs several hundred steps to settle the weakly determined spread).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from diffractflow.artifacts import atomic_write_path

from ..core.config import BeamConfig, CrystalConfig, DetectorConfig
from ..core.params import DemoParams
from ..core.simulator import simulate
from .refiner import Refiner, RefineSettings

#: the demo's settings and their defaults are the ``refine-demo`` model's
_DEMO = DemoParams.model_fields

TRUE_MOSAIC_SPREAD = 0.8
TRUE_MISSET = (5.0, 3.0, -2.0)
INIT_MOSAIC_SPREAD = 0.2
INIT_MISSET = (0.0, 0.0, 0.0)

FIXED_PARAMS = dict(
    cell_a=100.0, cell_b=100.0, cell_c=100.0, cell_alpha=90.0, cell_beta=90.0, cell_gamma=90.0,
    N_cells=(5, 5, 5), default_F=100.0, mosaic_domains=5, mosaic_seed=42,
)
HISTORY_KEYS = ("iteration", "loss", "mosaic_spread", "misset_x", "misset_y", "misset_z")


def demo_configs(mosaic=TRUE_MOSAIC_SPREAD, misset=TRUE_MISSET):
    """(crystal, detector, beam) of seed 001 with the given mosaic spread (deg) and misset (deg)."""
    crystal = CrystalConfig(**FIXED_PARAMS, mosaic_spread_deg=mosaic, misset_deg=tuple(misset))
    detector = DetectorConfig(fpixels=64, spixels=64, pixel_size_mm=0.1, distance_mm=100.0)
    beam = BeamConfig(wavelength_A=1.0, fluence=1e28)
    return crystal, detector, beam


@dataclass
class DemoOutcome:
    result: object                 # RefineResult
    experimental: np.ndarray
    initial: np.ndarray
    refined: np.ndarray
    errors: dict
    criteria: dict

    @property
    def passed(self) -> bool:
        return all(self.criteria.values())

    @property
    def history(self) -> dict:
        """History with seed 001's keys."""
        return {k: list(self.result.history[k]) for k in HISTORY_KEYS}


def check_criteria(result) -> tuple[dict, dict]:
    """Seed 001's success criteria: loss down >= 10x, mosaic within 0.1 deg, misset within 1 deg, finite."""
    f = result.final
    errors = {
        "mosaic_spread": abs(f["mosaic_spread"] - TRUE_MOSAIC_SPREAD),
        "misset_x": abs(f["misset_x"] - TRUE_MISSET[0]),
        "misset_y": abs(f["misset_y"] - TRUE_MISSET[1]),
        "misset_z": abs(f["misset_z"] - TRUE_MISSET[2]),
    }
    finite = result.finite and all(math.isfinite(v) for v in f.values())
    criteria = {
        "loss_reduction_ge_10x": bool(result.loss_final > 0 and result.loss_initial / result.loss_final >= 10.0
                                      or result.loss_final == 0.0 and result.loss_initial > 0),
        "mosaic_within_0.1deg": errors["mosaic_spread"] <= 0.1,
        "misset_within_1deg": max(errors["misset_x"], errors["misset_y"], errors["misset_z"]) <= 1.0,
        "no_nan_inf": bool(finite),
    }
    return errors, criteria


def run_demo(adam_iterations: int = _DEMO["iterations"].default, lr: float = _DEMO["lr"].default,
             lbfgs_steps: int = _DEMO["lbfgs_steps"].default,
             callback: Optional[Callable] = None, log: Optional[Callable[[str], None]] = print) -> DemoOutcome:
    """Generate the 'experimental' image at the truth, refine from the seed's start, check the criteria (defaults:
    :class:`~diff_sim_refiner.core.params.DemoParams`, the ``refine-demo`` command's model).

    ``log`` (default ``print``; None: silent) receives the seed's phase output as the seed writes it: the generated data
    (phase 3), the initial parameters (phase 4), the start banner and every 10th iteration (phase 5)."""
    say = log or (lambda line: None)

    torch.manual_seed(42)
    crystal, detector, beam = demo_configs()
    with torch.no_grad():
        experimental = simulate(crystal, detector, beam, dtype=torch.float64)
    say(f"Generated experimental data: {tuple(experimental.shape)}")
    say(f"  Image sum: {experimental.sum().item():.2e}")
    say(f"  Image max: {experimental.max().item():.2e}")
    say(f"  True mosaic_spread: {TRUE_MOSAIC_SPREAD}°")
    say(f"  True misset: {TRUE_MISSET}")
    start, _, _ = demo_configs(INIT_MOSAIC_SPREAD, INIT_MISSET)
    refiner = Refiner(start, detector, beam, experimental, ["mosaic", "misset"], dtype=torch.float64)
    initial = refiner.model_image()
    say("\nInitial parameters:")
    say(f"  mosaic_spread: {INIT_MOSAIC_SPREAD:.3f}° (true: {TRUE_MOSAIC_SPREAD}°)")
    say(f"  misset: ({INIT_MISSET[0]:.2f}, {INIT_MISSET[1]:.2f}, {INIT_MISSET[2]:.2f})° (true: {TRUE_MISSET})")
    settings = RefineSettings(optimizer="adam+lbfgs" if lbfgs_steps else "adam", iterations=adam_iterations,
                              lr=lr, lbfgs_steps=lbfgs_steps)
    say(f"\n{'=' * 60}")
    say(f"Starting refinement: {adam_iterations} Adam iterations"
        + (f" + {lbfgs_steps} L-BFGS steps" if lbfgs_steps else ""))
    say(f"{'=' * 60}")

    def progress(it: int, loss: float, vals: dict) -> None:
        if it % 10 == 0:
            say(f"Iter {it:3d}: loss={loss:.4e}, mosaic={vals['mosaic_spread']:.3f}°, "
                f"misset=({vals['misset_x']:+.2f}, {vals['misset_y']:+.2f}, {vals['misset_z']:+.2f})°")
        if callback is not None:
            callback(it, loss, vals)

    result = refiner.run(settings, callback=progress)
    h = result.history
    if h["iteration"] and h["iteration"][-1] % 10:
        say(f"Iter {h['iteration'][-1]:3d}: loss={h['loss'][-1]:.4e}, mosaic={h['mosaic_spread'][-1]:.3f}°, "
            f"misset=({h['misset_x'][-1]:+.2f}, {h['misset_y'][-1]:+.2f}, {h['misset_z'][-1]:+.2f})°")
    refined = refiner.model_image()
    errors, criteria = check_criteria(result)
    return DemoOutcome(result, experimental.numpy(), initial, refined, errors, criteria)


def results_table(outcome: DemoOutcome) -> str:
    """Seed 001's phase 6 as the seed writes it: the results table and the convergence lines (plain text)."""
    r = outcome.result
    e = outcome.errors
    lines = [f"\n{'=' * 60}", "REFINEMENT RESULTS", f"{'=' * 60}", "",
             f"{'Parameter':<18} | {'True':>8} | {'Initial':>8} | {'Refined':>8} | {'Error':>8}", "-" * 60]
    lines.append(f"{'mosaic_spread (°)':<18} | {TRUE_MOSAIC_SPREAD:>8.3f} | {r.initial['mosaic_spread']:>8.3f} | "
                 f"{r.final['mosaic_spread']:>8.3f} | {e['mosaic_spread']:>8.3f}")
    for i, axis in enumerate("xyz"):
        k = f"misset_{axis}"
        lines.append(f"{k + ' (°)':<18} | {TRUE_MISSET[i]:>8.2f} | {r.initial[k]:>8.2f} | {r.final[k]:>8.2f} | "
                     f"{e[k]:>8.2f}")
    lines += ["", "Convergence:", f"  Initial loss: {r.loss_initial:.4e}", f"  Final loss:   {r.loss_final:.4e}",
              f"  Reduction:    {r.loss_initial / r.loss_final if r.loss_final > 0 else float('inf'):.1f}x"]
    return "\n".join(lines)


def plot_demo(outcome: DemoOutcome, path: Path) -> Path:
    """Seed 001's 2x3 figure: experimental / initial / refined images, loss, mosaic and misset curves."""
    import matplotlib  # matplotlib (about 2 s to import) only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    h = outcome.history
    fig, axes = plt.subplots(2, 3, figsize=(15, 10))
    vmax = float(outcome.experimental.max())
    for ax, img, title in ((axes[0, 0], outcome.experimental, "Experimental (Ground Truth)"),
                           (axes[0, 1], outcome.initial, "Initial Guess"),
                           (axes[0, 2], outcome.refined, "Refined")):
        im = ax.imshow(img, cmap="viridis", origin="lower", vmin=0, vmax=vmax)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046, label="photons")
    axes[1, 0].semilogy(h["iteration"], np.maximum(h["loss"], 1e-300))
    axes[1, 0].set_xlabel("Iteration")
    axes[1, 0].set_ylabel("MSE Loss")
    axes[1, 0].set_title("Loss Convergence")
    axes[1, 1].plot(h["iteration"], h["mosaic_spread"], label="Refined")
    axes[1, 1].axhline(TRUE_MOSAIC_SPREAD, color="r", linestyle="--", label="Truth")
    axes[1, 1].set_xlabel("Iteration")
    axes[1, 1].set_ylabel("Mosaic Spread (deg)")
    axes[1, 1].legend()
    for i, k in enumerate(("misset_x", "misset_y", "misset_z")):
        axes[1, 2].plot(h["iteration"], h[k], label=k, color=f"C{i}")
        axes[1, 2].axhline(TRUE_MISSET[i], color=f"C{i}", linestyle="--", alpha=0.5)
    axes[1, 2].set_xlabel("Iteration")
    axes[1, 2].set_ylabel("Misset Angles (deg)")
    axes[1, 2].legend()
    plt.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def write_demo_outputs(outcome: DemoOutcome, out: Path) -> dict[str, Path]:
    """history.json (seed keys), summary.json and refinement_demo.png in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"history": out / "history.json", "summary": out / "summary.json", "figure": out / "refinement_demo.png"}
    with atomic_write_path(paths["history"]) as tmp:
        Path(tmp).write_text(json.dumps(outcome.history, indent=2))
    r = outcome.result
    summary = dict(r.summary(), truth={"mosaic_spread": TRUE_MOSAIC_SPREAD, "misset_x": TRUE_MISSET[0],
                                       "misset_y": TRUE_MISSET[1], "misset_z": TRUE_MISSET[2]},
                   errors=outcome.errors, criteria=outcome.criteria, passed=outcome.passed)
    with atomic_write_path(paths["summary"]) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    with atomic_write_path(paths["figure"]) as tmp:
        plot_demo(outcome, Path(tmp))
    return paths


__all__ = ["run_demo", "demo_configs", "check_criteria", "results_table", "plot_demo", "write_demo_outputs",
           "DemoOutcome", "TRUE_MOSAIC_SPREAD", "TRUE_MISSET", "HISTORY_KEYS"]
