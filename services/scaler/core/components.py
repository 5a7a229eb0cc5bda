"""Scale components of the v1 diffuse scaling model, on DIALS' scaling-component framework.

Both components derive from DIALS' ``ScaleComponentBase`` (parameters held as ``flex.double``,
``calculate_scales_and_derivatives`` returning the scale and a ``scitbx.sparse`` derivative matrix) and
register their parameters with a DIALS ``active_parameter_manager`` (see
:class:`DiffuseActiveParameterManager`). The refinement engine itself works on numpy arrays
(``core.refine``) for speed; the components are the model state and the per-reflection API.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from dials.algorithms.scaling.active_parameter_managers import active_parameter_manager
from dials.algorithms.scaling.model.components.scale_components import ScaleComponentBase
from dials.array_family import flex
from scitbx import sparse

from .errors import ParameterLimitExceeded
from .params import MAX_SMOOTHER_CONTROL_POINTS
from .params import RELATIVE_DEFAULTS as _D
from .refine import second_difference
from .smoother import GaussianSmoother1D


class DiffuseActiveParameterManager(active_parameter_manager):
    """DIALS active parameter manager that components join one at a time (seed 003 constructors).

    ``x`` / ``set_param_vals`` / ``get_param_vals`` / ``select_parameters`` are DIALS' own.
    """

    def __init__(self):
        super().__init__({}, [])

    def add_component(self, name: str, component: ScaleComponentBase) -> None:
        if name in self.components:
            raise ValueError(f"component {name!r} already registered")
        start = len(self.x)
        self.x.extend(component.free_parameters)
        self.components[name] = {"object": component, "n_params": len(component.free_parameters),
                                 "start_idx": start, "end_idx": len(self.x)}
        self.components_list.append(name)
        self.n_active_params = len(self.x)

    def sync_from_components(self) -> None:
        """Refresh ``x`` after components' parameters were set directly."""
        x = flex.double()
        for name in self.components_list:
            x.extend(self.components[name]["object"].free_parameters)
        self.x = x


def _column(table, name: str) -> np.ndarray:
    """A column of a flex.reflection_table or a mapping of arrays, as numpy."""
    col = table[name]
    if hasattr(col, "as_numpy_array"):
        return col.as_numpy_array()
    return np.asarray(col)


def _sparse_from_rows(n_rows: int, n_cols: int, cols: np.ndarray, vals: np.ndarray) -> sparse.matrix:
    """scitbx sparse (n_rows x n_cols) matrix with entries (i, cols[i, m]) = vals[i, m] (zeros skipped)."""
    cols = np.asarray(cols).reshape(n_rows, -1)
    vals = np.asarray(vals, dtype=float).reshape(n_rows, -1)
    m = sparse.matrix(n_rows, n_cols)
    rows, slots = np.nonzero(vals)
    for r, j, v in zip(rows.tolist(), cols[rows, slots].tolist(), vals[rows, slots].tolist()):
        m[r, j] = v
    return m


class PerStillMultiplierComponent(ScaleComponentBase):
    """One positive multiplicative scale b_i per still (initial 1.0): I_obs ~ b_i * I_ref."""

    null_parameter_value = 1.0

    def __init__(self, active_parameter_manager: Optional[DiffuseActiveParameterManager],
                 still_ids: list[int], initial_values: Optional[dict] = None):
        ids = [int(s) for s in still_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("still_ids must be unique")
        if not ids:
            raise ValueError("still_ids is empty")
        init = dict(initial_values or {})
        unknown = set(int(k) for k in init) - set(ids)
        if unknown:
            raise ValueError(f"initial_values for unknown still ids: {sorted(unknown)[:10]}")
        vals = [float(init.get(s, init.get(str(s), 1.0))) for s in ids]
        if not all(np.isfinite(v) and v > 0 for v in vals):
            raise ValueError("initial per-still scales must be finite and > 0")
        super().__init__(flex.double(vals))
        self.still_ids = np.asarray(ids, dtype=np.int64)
        self._order = np.argsort(self.still_ids)
        self._index_of = {s: i for i, s in enumerate(ids)}
        self._indices = []
        if active_parameter_manager is not None:
            active_parameter_manager.add_component("per_still_scale", self)

    def index_of(self, still_ids) -> np.ndarray:
        """Parameter index for each still id (ValueError for unknown ids)."""
        s = np.asarray(still_ids, dtype=np.int64)
        pos = np.searchsorted(self.still_ids[self._order], s)
        pos = np.clip(pos, 0, len(self.still_ids) - 1)
        idx = self._order[pos]
        bad = self.still_ids[idx] != s
        if np.any(bad):
            raise ValueError(f"unknown still id(s): {np.unique(s[bad])[:10].tolist()}")
        return idx

    @property
    def values(self) -> np.ndarray:
        return np.asarray(self._parameters, dtype=float)

    @ScaleComponentBase.data.setter
    def data(self, data):
        assert "still_id" in data
        self._data = data

    def update_reflection_data(self, selection=None, block_selections=None):
        sid = np.asarray(self.data["still_id"])
        if selection is not None:
            sid = sid[np.asarray(selection)]
        idx = self.index_of(sid)
        if block_selections:
            self._indices = [idx[np.asarray(sel)] for sel in block_selections]
        else:
            self._indices = [idx]
        self._n_refl = [len(i) for i in self._indices]

    def calculate_scales_and_derivatives(self, reflection_table=None, block_id: int = 0):
        """Scales b_{still(i)} and the derivative matrix (unit entries, one per row)."""
        idx = self.index_of(_column(reflection_table, "still_id")) if reflection_table is not None \
            else self._indices[block_id]
        scales = flex.double(self.values[idx])
        return scales, _sparse_from_rows(len(idx), self.n_params, idx, np.ones(len(idx)))

    def calculate_scales(self, reflection_table=None, block_id: int = 0):
        idx = self.index_of(_column(reflection_table, "still_id")) if reflection_table is not None \
            else self._indices[block_id]
        return flex.double(self.values[idx])


class ResolutionSmootherComponent(ScaleComponentBase):
    """Multiplicative g(|q|): 1-D Gaussian smoother with <= 5 control points, shared by all stills.

    Control points are spread evenly over ``resolution_range`` = (q_min, q_max) in |q| = 1/d (1/Å)
    following DIALS' GaussianSmoother layout; values start at 1.0. Smoothness restraint: a penalty on
    second differences of the control values (plus a weak ridge towards 1 that fixes the exact
    degeneracy between a global factor on g and the references).
    """

    null_parameter_value = 1.0

    def __init__(self, active_parameter_manager: Optional[DiffuseActiveParameterManager],
                 n_control_points: int, resolution_range: tuple[float, float],
                 smoothness_weight: float = _D.smoothness_weight, ridge_weight: float = 1e-4):
        n = int(n_control_points)
        if n > MAX_SMOOTHER_CONTROL_POINTS:
            raise ParameterLimitExceeded(f"resolution smoother has {n} control points, v1 allows <= 5")
        if n < 2:
            raise ValueError(f"resolution smoother needs >= 2 control points, got {n}")
        q0, q1 = (float(v) for v in resolution_range)
        if not (np.isfinite(q0) and np.isfinite(q1) and 0 <= q0 < q1):
            raise ValueError(f"resolution_range must be (q_min, q_max) with 0 <= q_min < q_max, got {resolution_range}")
        super().__init__(flex.double(n, 1.0))
        self.smoother = GaussianSmoother1D((q0, q1), n)
        self.resolution_range = (q0, q1)
        self.smoothness_weight = float(smoothness_weight)
        self.ridge_weight = float(ridge_weight)
        self._q = []
        if active_parameter_manager is not None:
            active_parameter_manager.add_component("resolution_smoother", self)

    @property
    def values(self) -> np.ndarray:
        return np.asarray(self._parameters, dtype=float)

    def scale_at(self, q) -> np.ndarray:
        """g(|q|) for |q| in 1/Å (clipped into the smoother range)."""
        qc = np.clip(np.asarray(q, dtype=float), *self.resolution_range)
        return self.smoother.value(qc, self.values)

    @ScaleComponentBase.data.setter
    def data(self, data):
        assert "q_magnitude" in data or "d" in data
        self._data = data

    @staticmethod
    def q_of(table) -> np.ndarray:
        """|q| = 1/d (1/Å) from a ``q_magnitude`` or ``d`` column."""
        try:
            return _column(table, "q_magnitude").astype(float)
        except (KeyError, RuntimeError):
            return 1.0 / _column(table, "d").astype(float)

    def update_reflection_data(self, selection=None, block_selections=None):
        q = self.q_of(self.data)
        if selection is not None:
            q = q[np.asarray(selection)]
        self._q = [q[np.asarray(s)] for s in block_selections] if block_selections else [q]
        self._n_refl = [len(x) for x in self._q]

    def calculate_restraints(self):
        """(residuals, gradient) of the restraint functional sum (D2 c)^2 + ridge sum (c-1)^2 (unit weight)."""
        c = self.values
        D2 = second_difference(len(c))
        res = self.smoothness_weight * np.sum((D2 @ c) ** 2) + self.ridge_weight * np.sum((c - 1) ** 2)
        grad = 2 * self.smoothness_weight * D2.T @ (D2 @ c) + 2 * self.ridge_weight * (c - 1)
        return flex.double([float(res)]), flex.double(grad)

    def calculate_scales_and_derivatives(self, reflection_table=None, block_id: int = 0):
        """g at each reflection's |q| and d g / d c (sparse, <= 3 entries per row)."""
        q = self.q_of(reflection_table) if reflection_table is not None else self._q[block_id]
        qc = np.clip(q, *self.resolution_range)
        start, w = self.smoother.weights(qc)
        cols = start[:, None] + np.arange(w.shape[1])
        vals = (w * self.values[cols]).sum(axis=1)
        return flex.double(vals), _sparse_from_rows(len(q), self.n_params, cols, w)

    def calculate_scales(self, reflection_table=None, block_id: int = 0):
        q = self.q_of(reflection_table) if reflection_table is not None else self._q[block_id]
        return flex.double(self.scale_at(q))
