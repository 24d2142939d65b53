"""The run record of a benchmark: versions, source revision, manifest hash, configuration."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Mapping

import numpy as np

from ..fit.pools import Pool

# --------------------------------------------------------------------------- reproducibility


def manifest_hash(pool: Pool) -> str:
    """SHA-256 over the sorted unique "sha256,label,generator" lines of `pool` (order-free)."""
    lines = sorted({f"{s},{lab},{g}" for s, lab, g in zip(pool.sha256, pool.label, pool.generator)})
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def versions() -> dict:
    """Versions of python, clipdet, numpy, scikit-learn, and of torch, open_clip, faiss, h5py, matplotlib.

    Modules already imported report their `__version__`; the others are read from the installed
    package metadata (without importing them), or left out when not installed.
    """
    from importlib import metadata

    import sklearn

    from .._version import __version__

    out = {"python": platform.python_version(), "clipdet": __version__, "numpy": np.__version__,
           "scikit-learn": sklearn.__version__}
    for mod, dist in (("torch", "torch"), ("open_clip", "open_clip_torch"), ("faiss", "faiss-cpu"),
                      ("h5py", "h5py"), ("matplotlib", "matplotlib")):
        m = sys.modules.get(mod)
        if m is not None and getattr(m, "__version__", None):
            out[mod] = str(m.__version__)
            continue
        for d in (dist, "faiss-gpu-cu12") if mod == "faiss" else (dist,):
            try:
                out[mod] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def source_revision() -> dict:
    """The git commit of the clipdet source tree and whether it had uncommitted changes ({} outside git)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=here,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": bool(status.strip())}


def run_record(config: Mapping, pool: Pool | None = None) -> dict:
    """What a run needs to be reproduced and audited: config, seed(s), data manifest hash, versions, machine.

    The manifest hash comes from `pool` when given, else from ``config["manifest_hash"]``.
    """
    cfg = json.loads(json.dumps(dict(config), default=str))
    seeds = cfg.get("seeds", cfg.get("seed"))
    return {
        "config": cfg,
        "seeds": seeds,
        "manifest_hash": manifest_hash(pool) if pool is not None else cfg.get("manifest_hash"),
        "n_images": len(pool) if pool is not None else cfg.get("n_images"),
        "versions": versions(),
        "source": source_revision(),
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "processor": platform.processor(), "cpu_count": os.cpu_count()},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
