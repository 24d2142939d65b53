"""The child side of `extract(..., engine="ray")`: the Ray driver process, run by `ray_driver.extract_on_ray`.

It connects to (or starts) Ray, runs the local pipeline with Ray's reader and embedder stages
(`ray_stages`), writes the cache batch by batch, and leaves its summary or its error in OUT.pkl for the
parent. Ray's own log lines (its loggers, its C++ logs on stderr, the raylet reports it prints on stdout) go
to LOG; only clipdet's progress bar and warnings reach the terminal.
Usage (internal): python -m clipdet.extract.engines.ray_child IN.pkl OUT.pkl LOG
"""

from __future__ import annotations

import os
import pickle
import sys

from ...errors import ClipdetError, UsageError
from .ray_driver import PARENT_ENV, RayClusterError

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_group() -> None:
    """Stop this driver at once, with the local Ray it started (its descendants, and its process group:
    Ray's workers run in process groups of their own), by SIGKILL.

    Processes of a cluster this run only connected to are neither and go on."""
    import signal

    try:
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                p.kill()
            except psutil.Error:
                pass
    except Exception:  # noqa: BLE001 - psutil missing or failing: the process group below still goes
        pass
    if hasattr(os, "killpg") and os.getpgrp() == os.getpid():  # started in its own group by ray_driver
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(137)


def tie_to_parent(parent: int, poll: float = 0.2) -> None:
    """End this driver and its Ray as soon as `parent` (the `clipdet extract` process) is gone, even by SIGKILL.

    Linux: a parent-death signal (prctl PR_SET_PDEATHSIG) whose handler ends the group; everywhere: a
    watchdog thread that polls os.getppid() (reparented: the parent is gone) and does the same from its
    own thread, so a main thread busy in native code does not delay it."""
    import signal
    import threading
    import time

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            signal.signal(signal.SIGUSR2, lambda *_: end_group())
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR2), 0, 0, 0)
        except (OSError, AttributeError, ValueError):  # no prctl here: the watchdog alone
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        end_group()

    if os.getppid() != parent:  # gone before the signal was armed
        end_group()
    threading.Thread(target=watch, name="clipdet-parent-watch", daemon=True).start()


def connect(address: str | None) -> bool:
    """Connect to the Ray cluster at `address` (host:port, 'auto' or ray://), or start a local Ray when None.

    Returns whether this call started Ray locally. A host:port is probed first, so a wrong address is
    one line at once instead of Ray's minute of retries.
    """
    import logging

    import ray

    kw = {"log_to_driver": False, "logging_level": logging.WARNING}
    if not address:
        import psutil

        store = int(min(2 << 30, 0.2 * psutil.virtual_memory().total))
        # address="local": always a new Ray for this run, even when one started with `ray start` runs on
        # this machine (plain ray.init() would join that one, and refuse our object store size)
        ray.init(address="local", include_dashboard=False, object_store_memory=store, **kw)
        return True
    if address in ("auto", "local") or "://" in address:
        ray.init(address=address, **kw)
        return False
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r}: expected HOST:PORT of the Ray head (e.g. 10.0.0.5:6379)")
    import socket

    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise RayClusterError(f"Ray cluster {address}: cannot connect ({e.strerror or e}); start it with `ray start "
                              "--head` (or `ray up cluster.yaml`) or fix --ray-address / RAY_ADDRESS") from None
    from ray._private import services

    keep = getattr(services, "resolve_ip_for_localhost", None)
    if keep is not None and host in ("127.0.0.1", "localhost", "::1"):
        # Ray >= 2.52 swaps a loopback bootstrap address for the host's outward IP (ray-project/ray#59110),
        # which a head started with --node-ip-address 127.0.0.1 does not listen on: keep it as given.
        services.resolve_ip_for_localhost = lambda h: h
    try:
        ray.init(address=address, **kw)
    finally:
        if keep is not None:
            services.resolve_ip_for_localhost = keep
    return False


def plan(device: str, batch_size: int | None) -> tuple:
    """(RayStages, batch size) for the connected cluster: one actor per GPU, else one CPU actor per node
    that uses the node's cores (as the local engine's model uses this machine's)."""
    import ray

    from .ray_stages import RayStages

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if not nodes:
        raise RayClusterError("the Ray cluster has no live node with CPUs")
    gpus = 0 if device == "cpu" else int(ray.cluster_resources().get("GPU", 0))
    threads = {n["NodeID"]: int(n["Resources"]["CPU"]) for n in nodes}
    small = min(threads.values()) < 2  # 1-CPU nodes: the embedder and a reader share the CPU
    # Readers ask for half a CPU and CPU actors for a whole one: the stages stay separate operators (Ray Data
    # fuses neighbouring stages with equal requests into one process), so decoding overlaps inference.
    decode, embed = (0.25, 0.5) if small else (0.5, 1.0)
    if gpus:  # GPU actors are separate operators anyway: one reader per CPU
        decode = 1.0
    actors = gpus if gpus else len(nodes)
    stages = RayStages(device=device if gpus or device != "auto" else "cpu", precision=None, actors=actors,
                       gpus=bool(gpus), threads=threads, decode_cpus=decode, embed_cpus=embed, spec="")
    return stages, batch_size or (256 if gpus else 32)


def _cause(e: BaseException) -> ClipdetError | None:
    """The clipdet error a Ray exception carries (a model that cannot load in an actor), if any."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        cause = getattr(x, "cause", None)
        if isinstance(x, ClipdetError) and cause is None and type(x).__module__.startswith("clipdet"):
            return x
        stack += [cause, x.__cause__, x.__context__]
    return None


def run_child(inp: str, out: str, log: str) -> int:
    """The Ray driver: connect, run clipdet.extract with RayStages, write the summary or the error."""
    import ray  # noqa: F401 - imported before stderr is redirected: Ray's log handlers keep the log file
    import ray.data  # noqa: F401

    term = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    os.dup2(fd, 2)
    os.dup2(fd, 1)  # stdout too: Ray prints what its raylets report (a worker killed, ...) on sys.stdout
    os.close(fd)
    sys.stderr = term  # progress bar and warnings on the terminal; Ray's C++ and Python logs in the log
    import warnings

    warnings.simplefilter("default")
    warnings.formatwarning = lambda m, c, *a, **k: f"clipdet: warning: {m}\n"  # as the CLI prints them
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")  # Ray's deprecation notes are not the user's
    with open(inp, "rb") as f:
        job = pickle.load(f)
    try:
        from ..lazy import LazyBackbone
        from ..pipeline import extract_local
        from .ray_stages import preprocessing

        early = preprocessing(job["backbone"], job["key"])  # builds the preprocessor while Ray starts
        connect(job["address"])
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows reach the driver in input order
        ctx.enable_progress_bars = False
        stages, batch = plan(job["device"], job["batch_size"])
        stages.spec, stages.precision, stages.preprocessing = job["backbone"], job["precision"], early
        lazy = LazyBackbone(job["backbone"], job["device"], job["layers"], key=job["key"], precision=job["precision"],
                            heads=job["heads"])
        kw = {k: job[k] for k in ("views", "quiet", "draft", "precision", "record_cached", "compact", "rehash")}
        if job["max_pixels"]:
            kw["max_pixels"] = job["max_pixels"]
        summary = extract_local(job["refs"], job["backbone"], cache=job["cache"], batch_size=batch,
                                device=job["device"], layers=job["layers"] or None, heads=job["heads"] or None,
                                lazy=lazy, stages=stages, **kw)
        result = {"summary": summary}
    except KeyboardInterrupt:
        result, code = None, 130
    except Exception as e:  # noqa: BLE001 - every end becomes one line in the parent
        err = _cause(e)
        if err is None:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            err = RayClusterError(f"Ray: {type(e).__name__}: {first} (Ray's log: {log})")
        try:
            pickle.dumps(err)
        except Exception:  # noqa: BLE001 - an error class that does not pickle: keep its text
            err = ClipdetError(str(err))
        result = {"error": err}
    if result is not None:
        code = 0
        with open(out + ".tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(out + ".tmp", out)
    term.flush()
    ray.shutdown()  # stops the Ray this run started, or disconnects from the cluster
    return code


if __name__ == "__main__":
    from clipdet.extract.engines.ray_child import run_child as child  # the package's classes, so errors unpickle
    from clipdet.extract.engines.ray_child import tie_to_parent

    if os.environ.get(PARENT_ENV, "").isdigit():
        tie_to_parent(int(os.environ[PARENT_ENV]))
    code = child(*sys.argv[1:4])
    sys.stdout.flush()
    os._exit(code)  # Ray is shut down and the result written: skip the interpreter's slow teardown
