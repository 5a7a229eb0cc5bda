"""Cluster labels computed in the service when none are given: streamed PCA + k-means (fixed seed).

Frames are binned (``bin`` x ``bin``) and log-scaled, reduced by an IncrementalPCA fitted chunk by chunk
(bounded memory), and the (N, n_components) scores are clustered with k-means.
"""

from __future__ import annotations

import numpy as np

from .source import iter_chunks


def _features(block: np.ndarray, b: int) -> np.ndarray:
    n, ky, kx = block.shape
    ky2, kx2 = (ky // b) * b, (kx // b) * b
    x = block[:, :ky2, :kx2].astype(np.float32)
    if b > 1:
        x = x.reshape(n, ky2 // b, b, kx2 // b, b).mean(axis=(2, 4))
    return np.log1p(np.maximum(x, 0)).reshape(n, -1)


def autolabel(source, cfg, chunk: int, progress=None) -> tuple[np.ndarray, dict]:
    """Return (labels (N,) int64 in 0..n_clusters-1, info dict)."""
    # imported at first use: scikit-learn takes 1.6 s to import and only runs without given labels
    from sklearn.cluster import KMeans
    from sklearn.decomposition import IncrementalPCA

    n = source.n_frames
    k = int(min(cfg.n_components, n))
    step = max(chunk, k)
    ipca = IncrementalPCA(n_components=k)
    pending = None
    for a, b, block in iter_chunks(source, step):
        f = _features(block, cfg.bin)
        if pending is not None:
            f = np.concatenate([pending, f])
            pending = None
        if len(f) < k:
            pending = f
            continue
        ipca.partial_fit(f)
        if progress:
            progress("autolabel: PCA fit", b, n)
    if not hasattr(ipca, "components_"):
        ipca.partial_fit(pending)
    scores = np.empty((n, k), dtype=np.float32)
    for a, b, block in iter_chunks(source, step):
        scores[a:b] = ipca.transform(_features(block, cfg.bin))
        if progress:
            progress("autolabel: PCA scores", b, n)
    km = KMeans(n_clusters=cfg.n_clusters, random_state=cfg.seed, n_init=4)
    labels = km.fit_predict(scores).astype(np.int64)
    info = {
        "method": "IncrementalPCA + KMeans",
        "n_components": k,
        "n_clusters": cfg.n_clusters,
        "bin": cfg.bin,
        "seed": cfg.seed,
        "explained_variance_ratio": [float(v) for v in ipca.explained_variance_ratio_],
        "inertia": float(km.inertia_),
    }
    return labels, info
