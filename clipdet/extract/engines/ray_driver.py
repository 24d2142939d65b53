"""`extract(..., engine="ray")`: the Ray driver, run in a child process that this process supervises.

Why a child: when the Ray cluster goes away, Ray ends its driver process at once (exit code 1, from
its core worker, no Python exception to catch). The child is the Ray driver and writes the cache,
batch by batch, through clipdet.extract; this process turns any end of it into one line: the child's
own clipdet errors as they are, a vanished cluster as `RayClusterError` (exit code 2). Every batch
written before is in the cache, and a re-run skips it (content hashes, as with the local engine).

Ray's own log lines go to a log file (named in the error, removed after a clean run), not the terminal.
The progress bar and warnings reach the terminal as with the local engine.

The child is `clipdet.extract.engines.ray_child` (run as `python -m ... IN.pkl OUT.pkl LOG`). It runs in
its own process group, with the Ray it starts: Ctrl-C here is passed on to it, and when this process
ends in any way (even SIGKILL) the child ends that group: the driver and its local Ray stop at once
(`ray_child.tie_to_parent`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile

from ...errors import ClipdetError, UsageError

#: tells the child the pid of the process it belongs to (it stops, with its Ray, when that one is gone)
PARENT_ENV = "CLIPDET_RAY_PARENT"


class RayClusterError(ClipdetError):
    """The Ray cluster could not be reached, or went away mid-run (exit code 2)."""


def extract_on_ray(refs, backbone: str, *, cache=None, views=None, batch_size=None, device="auto", layers=None,
                   quiet=True, max_pixels=None, draft=False, precision="auto", record_cached=True, compact=True,
                   lazy=None, rehash=False, ray_address=None, heads=None, workers=None):
    """Run clipdet.extract.extract with the Ray engine in a child process; returns its ExtractSummary.

    `workers` (the local engine's loader threads) does not apply: Ray runs one reader per CPU of each node.
    """
    from ...cache import FeatureCache

    fc = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    if fc.readonly:
        raise UsageError("--engine ray writes new features to the cache; with a read-only cache use --engine local")
    if lazy is not None:
        backbone, device, precision = lazy.spec, lazy.device, lazy.precision
        layers = layers or lazy.layers
        heads = heads or lazy.heads
    job = {"refs": list(refs), "backbone": backbone, "key": lazy.key if lazy is not None else None,
           "cache": os.path.abspath(fc.path), "views": views, "batch_size": batch_size, "device": device,
           "layers": tuple(layers or ()), "heads": int(heads or 0), "quiet": quiet, "max_pixels": max_pixels,
           "draft": draft,
           "precision": precision, "record_cached": record_cached, "compact": compact, "rehash": rehash,
           "address": ray_address or os.environ.get("RAY_ADDRESS") or None}
    where = job["address"] or "a local Ray started for this run"
    fd, log = tempfile.mkstemp(prefix="clipdet-ray-", suffix=".log")
    os.close(fd)
    with tempfile.TemporaryDirectory(prefix="clipdet-ray-") as tmp:
        inp, out = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
        with open(inp, "wb") as f:
            pickle.dump(job, f)
        try:
            rc = _supervise([sys.executable, "-m", "clipdet.extract.engines.ray_child", inp, out, log])
        except KeyboardInterrupt:
            os.unlink(log)
            raise
        result = None
        if os.path.exists(out):
            with open(out, "rb") as f:
                result = pickle.load(f)
    if result is not None and "summary" in result:
        os.unlink(log)
        return result["summary"]
    if rc in (130, -signal.SIGINT):
        os.unlink(log)
        raise KeyboardInterrupt
    if result is not None and "error" in result:
        if log not in str(result["error"]):
            os.unlink(log)  # an error that is not Ray's (a bad option, a model that cannot load) needs no log
        raise result["error"]
    raise RayClusterError(
        f"the Ray cluster ({where}) went away mid-run (Ray ended its driver, exit code {rc}; Ray's log: {log}); "
        f"every batch written so far is in the cache {job['cache']}: run the same command again to finish the rest")


def _supervise(cmd: list[str]) -> int:
    """Run the child with this package first on its path; on Ctrl-C give it time to stop Ray cleanly."""
    env = dict(os.environ)
    here = os.path.abspath(__file__)  # <root>/clipdet/extract/engines/ray_driver.py
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(here))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env[PARENT_ENV] = str(os.getpid())
    # its own session and process group: the child and the Ray processes it starts are one group to end
    proc = subprocess.Popen(cmd, env=env, start_new_session=sys.platform != "win32")
    try:
        return proc.wait()
    except KeyboardInterrupt:  # pass Ctrl-C on: the child stops its Ray and writes what it has
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _end_group(proc)
        raise
    except BaseException:
        _end_group(proc)
        raise


def _end_group(proc) -> None:
    """SIGKILL the child's process group (the child and the local Ray it started) and reap the child."""
    with contextlib.suppress(OSError):
        if sys.platform != "win32":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    proc.wait()
