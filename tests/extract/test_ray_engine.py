"""`--engine ray` on a real two-node Ray cluster bound to 127.0.0.1 (issue 9).

The cluster is started by a module fixture (ray.cluster_utils.Cluster: a head and a second node, one CPU
and a small object store each) and stopped by it; the test process itself never connects to Ray (the
engine's driver runs in a child process). Ray is a test dependency (`make test` installs clipdet[ray]):
when it is missing these tests fail, they are not skipped.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import psutil
import pytest
from conftest import CLIPDET, write_image

import clipdet
from clipdet.cache import FeatureCache
from clipdet.extract.discover import discover
from clipdet.extract.lazy import LazyBackbone

STORE = 200 * 1024 * 1024


def _cluster(nodes: int):
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE,
                                                      "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    for _ in range(nodes - 1):
        c.add_node(num_cpus=1, object_store_memory=STORE, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    assert c.address.startswith("127.0.0.1:")
    return c


@pytest.fixture(scope="module")
def cluster():
    """A two-node Ray cluster on 127.0.0.1 (stopped at the end of the module)."""
    c = _cluster(2)
    yield c
    c.shutdown()


def _tree(root, n: int, bad: bool = True):
    for i in range(n):
        cls = "real/a" if i % 2 else "fake/genA"
        write_image(root / cls / f"im{i:03d}{'.jpg' if i % 3 else '.png'}", size=(40 + 3 * i, 36 + 2 * i), seed=i,
                    fake=not i % 2)
    if bad:
        (root / "real" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _rows(cache: str, key: str, view: str) -> list[bytes]:
    """Every feature row of (key, view) over all live segments (duplicates included), read with h5py."""
    out = []
    for seg in FeatureCache(cache).segments():
        with h5py.File(seg, "r") as f:
            if f"features/{key}/{view}" in f:
                out += list(f[f"features/{key}/{view}/sha256"][()])
    return out


def _kill_a_busy_embedder(proc, cache: str, deadline: float) -> int | None:
    """SIGKILL one embedding actor once the run `proc` writes batches into `cache`; its pid, or None."""
    while proc.poll() is None and time.time() < deadline:
        if glob.glob(cache + ".d/seg-*"):  # the run is writing batches: the embedder is busy
            for w in _embed_workers(os.getpid()):
                w.send_signal(signal.SIGKILL)
                return w.pid
        time.sleep(0.02)
    return None


def _embed_workers(root_pid: int) -> list[psutil.Process]:
    """The Ray actor processes running the embedder, among the descendants of `root_pid` (our cluster)."""
    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if "Embedder" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_ray_engine_matches_local(cluster, tmp_path, tiny_spec, tiny_backbone, run_cli):
    """Same images, features, metadata and error records as the local engine; same exit code and lines."""
    tree = _tree(tmp_path / "tree", 14)
    local, remote = str(tmp_path / "local.h5"), str(tmp_path / "ray.h5")
    s = clipdet.extract(discover([str(tree)]), tiny_spec, cache=local, views="jpeg:75",
                        lazy=LazyBackbone(tiny_spec, layers=(-1, 0), loaded=tiny_backbone, heads=2))
    r = run_cli("extract", tree, "-b", tiny_spec, "-c", remote, "--views", "jpeg:75", "--layers", "-1,0",
                "--heads", "2", "--engine", "ray", "--ray-address", cluster.address, "--batch-size", "4")
    assert r.exit_code == 1, r.stderr  # one file skipped, as locally
    assert f"skipped {tree}/real/a/broken.jpg: " in r.stderr
    assert "14 new, 1 skipped" in r.stdout and s.new == 14
    a, b = FeatureCache(local), FeatureCache(remote)
    key = tiny_backbone.info.key
    for view in ("clean", "jpeg:75"):
        fa, fb = a.load(key, view, with_layers=True, with_heads=True), b.load(key, view, with_layers=True,
                                                                              with_heads=True)
        assert sorted(fa.sha256) == sorted(fb.sha256) and len(fa.sha256) == 14
        pa, pb = np.argsort(fa.sha256), np.argsort(fb.sha256)
        # float16 rows: the model batches differ (4 here, 32 locally), so allow last-bit differences
        np.testing.assert_allclose(fa.embedding[pa], fb.embedding[pb], atol=2e-3)
        assert fa.layers.shape == fb.layers.shape == (14, 2, fa.layers.shape[2])  # CLS tokens of two blocks
        np.testing.assert_allclose(fa.layers[pa].astype(np.float32), fb.layers[pb].astype(np.float32), atol=2e-3)
        assert fb.layers_mean is not None  # and the blocks' patch-token means, as locally
        np.testing.assert_allclose(fa.layers_mean[pa], fb.layers_mean[pb], atol=2e-3)
        assert fa.heads.shape == fb.heads.shape and fa.heads.shape[0] == 14
        np.testing.assert_allclose(fa.heads[pa], fb.heads[pb], atol=2e-3)  # the attention-head decomposition
        np.testing.assert_allclose(fa.heads_rest[pa], fb.heads_rest[pb], atol=2e-3)
        assert sorted(_rows(remote, key, view)) == sorted(set(_rows(remote, key, view)))  # each image once
    assert a.images() == b.images()  # labels, generators, sizes, formats, paths
    assert [(e["path"], e["reason"]) for e in a.errors()] == [(e["path"], e["reason"]) for e in b.errors()]
    ga = {(g.key, g.view): (g.dim, g.layers, g.heads, g.backbone) for g in a.groups()}
    gb = {(g.key, g.view): (g.dim, g.layers, g.heads, g.backbone) for g in b.groups()}
    assert ga == gb

    # score --engine ray writes the same rows as score --engine local
    det = clipdet.fit(head="centroid", shots=4, seed=0, cache=local).save(tmp_path / "det.clipdet")
    out_l, out_r = tmp_path / "l.csv", tmp_path / "r.csv"
    assert run_cli("score", tree, "-d", det, "-c", str(tmp_path / "s1.h5"), "-o", out_l).exit_code == 1
    r = run_cli("score", tree, "-d", det, "-c", str(tmp_path / "s2.h5"), "-o", out_r, "--engine", "ray",
                "--ray-address", cluster.address)
    assert r.exit_code == 1, r.stderr
    lines_l, lines_r = out_l.read_text().splitlines(), out_r.read_text().splitlines()
    assert [x.split(",")[:2] for x in lines_l] == [x.split(",")[:2] for x in lines_r]
    assert [x.split(",")[4] for x in lines_l] == [x.split(",")[4] for x in lines_r]  # same verdicts
    # native-resolution tile views (score --tiles) go through the Ray engine like any view
    tl, tr = tmp_path / "tl.csv", tmp_path / "tr.csv"
    assert run_cli("score", tree, "-d", det, "-c", str(tmp_path / "s1.h5"), "-o", tl, "--tiles", "64:2").exit_code == 1
    r = run_cli("score", tree, "-d", det, "-c", str(tmp_path / "s2.h5"), "-o", tr, "--tiles", "64:2",
                "--engine", "ray", "--ray-address", cluster.address)
    assert r.exit_code == 1, r.stderr
    import csv

    rows_l, rows_r = (list(csv.DictReader(f.read_text().splitlines())) for f in (tl, tr))
    assert [x["label"] for x in rows_l] == [x["label"] for x in rows_r]
    def tiles(row):  # '' for a tile of an unreadable image
        return [float(v) if v else np.nan for v in row["tile_scores"].split(";")] if row["tile_scores"] else []

    for x, y in zip(rows_l, rows_r):
        np.testing.assert_allclose(tiles(x), tiles(y), atol=2e-3)


@pytest.mark.slow
def test_worker_killed_mid_run(cluster, tmp_path, tiny_spec, subprocess_env):
    """SIGKILL of a busy embedding actor: Ray restarts it and retries; every image is written exactly once."""
    tree = _tree(tmp_path / "tree", 24, bad=False)
    cache = str(tmp_path / "c.h5")
    cmd = CLIPDET + ["extract", str(tree), "-b", tiny_spec, "-c", cache, "--views", "blur:1.0",
                     "--batch-size", "2", "--engine", "ray", "--ray-address", cluster.address]
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = _kill_a_busy_embedder(proc, cache, time.time() + 120)
    out, err = proc.communicate(timeout=180)
    assert killed is not None, f"no embedding actor found busy mid-run (rc {proc.returncode}): {err}"
    assert proc.returncode == 0, err
    assert "24 images: 0 cached, 24 new, 0 skipped" in out
    key = FeatureCache(cache).groups()[0].key
    for view in ("clean", "blur:1"):
        rows = _rows(cache, key, view)
        assert len(rows) == 24 and len(set(rows)) == 24, view  # none lost, none written twice


@pytest.mark.slow
def test_cluster_stopped_mid_run(tmp_path, tiny_spec, subprocess_env):
    """The cluster goes away: one clear line, exit code 2; what was written stays and a re-run completes."""
    c = _cluster(1)
    tree = _tree(tmp_path / "tree", 24, bad=False)
    cache = str(tmp_path / "c.h5")
    cmd = CLIPDET + ["extract", str(tree), "-b", tiny_spec, "-c", cache, "--views", "blur:1.0",
                     "--batch-size", "2", "--engine", "ray", "--ray-address", c.address]
    try:
        proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and len(glob.glob(cache + ".d/seg-*")) < 2:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
    finally:
        c.shutdown()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipdet: error: the Ray cluster (127.0.0.1:"), err
    assert "went away mid-run" in lines[0] and "run the same command again" in lines[0]
    assert "Traceback" not in err
    log = lines[0].split("Ray's log: ", 1)[1].split(")", 1)[0]
    assert os.path.isfile(log)  # kept for the user: Ray's own account of what happened
    os.unlink(log)
    done = len(FeatureCache(cache).cached_shas(FeatureCache(cache).groups()[0].key, "clean"))
    assert 0 < done < 24
    # the re-run (here on the local engine: the cache is the same) embeds only the rest
    r = subprocess.run(CLIPDET + ["extract", str(tree), "-b", tiny_spec, "-c", cache, "--views", "blur:1.0"],
                       env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cached, new = (int(x.split()[0]) for x in r.stdout.split(": ", 1)[1].split(", ")[:2])
    assert cached >= 2 and new > 0 and cached + new == 24, r.stdout  # the stopped run's batches are kept
    fc = FeatureCache(cache)
    assert len(fc.cached_shas(fc.groups()[0].key, "blur:1")) == 24


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _of_session(session: str) -> list[psutil.Process]:
    """Live processes of the Ray session named `session` (workers a raylet starts late included)."""
    found = []
    for p in psutil.process_iter():
        try:
            if _alive(p) and any(session in a for a in p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_sigkill_of_extract_stops_its_driver_and_local_ray(tmp_path, tiny_spec, subprocess_env):
    """kill -9 of `clipdet extract --engine ray`: its driver child and the local Ray it started stop within
    seconds, instead of running on (and writing the cache) without a parent."""
    tree = _tree(tmp_path / "tree", 160, bad=False)
    cache = str(tmp_path / "c.h5")
    env = {k: v for k, v in subprocess_env.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    cmd = CLIPDET + ["extract", str(tree), "-b", tiny_spec, "-c", cache, "--views", "blur:1.0", "--batch-size", "2",
                     "--engine", "ray", "-q"]
    with open(tmp_path / "err.txt", "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    tracked: set = set()
    try:
        child, deadline = None, time.time() + 150
        while time.time() < deadline and proc.poll() is None:  # wait for the child and its raylet
            try:
                kids = psutil.Process(proc.pid).children()
                child = next((k for k in kids if "ray_child" in " ".join(k.cmdline())), None)
                if child is not None and any("raylet" in " ".join(p.cmdline())
                                             for p in child.children(recursive=True)):
                    break
            except psutil.Error:
                pass
            time.sleep(0.1)
        assert child is not None and proc.poll() is None, (proc.poll(), (tmp_path / "err.txt").read_text())
        tracked = {child, *child.children(recursive=True)}
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == child.pid:  # the child's own process group
                    tracked.add(p)
            except (OSError, psutil.Error):
                continue
        assert len(tracked) > 3, tracked
        session = next(a for p in tracked for a in p.cmdline() if "session_" in a).split("session_", 1)[1][:32]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        t0 = time.time()
        while time.time() - t0 < 10 and (any(_alive(p) for p in tracked) or _of_session(session)):
            time.sleep(0.1)
        left = [(p.pid, p.name()) for p in tracked if _alive(p)] + [(p.pid, p.name()) for p in _of_session(session)]
        tracked |= set(_of_session(session))
        assert not left, f"still running {time.time() - t0:.0f} s after the parent was killed: {left}"
    finally:
        for p in tracked:  # whatever a failed run leaves, this test started it
            if _alive(p):
                p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_ray_lines_go_to_the_log_when_a_worker_is_killed(tmp_path, tiny_spec, subprocess_env):
    """A killed embedding actor makes the raylet report it ('(raylet) A worker died ...'): with a local Ray
    that report goes to Ray's log file, not to the terminal, whose output stays clipdet's own."""
    tree = _tree(tmp_path / "tree", 40, bad=False)
    cache = str(tmp_path / "c.h5")
    env = {k: v for k, v in subprocess_env.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    cmd = CLIPDET + ["extract", str(tree), "-b", tiny_spec, "-c", cache, "--views", "blur:1.0", "--batch-size", "2",
                     "--engine", "ray"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = _kill_a_busy_embedder(proc, cache, time.time() + 150)
    out, err = proc.communicate(timeout=180)
    assert killed is not None, f"no embedding actor found busy mid-run (rc {proc.returncode}): {err}"
    assert proc.returncode == 0, err
    assert out.splitlines() == [ln for ln in out.splitlines() if ln.startswith("40 images: 0 cached, 40 new")], out
    shown = out + err
    assert "raylet" not in shown and "worker died" not in shown.lower() and "Ray" not in err, shown


def test_unreachable_address_is_one_line(cluster, tmp_path, tiny_spec, run_cli, make_image):
    """A wrong --ray-address fails at once with one line naming it (no minute of Ray retries); so does a
    backbone that cannot be loaded, as with the local engine; no log file is left behind for either."""
    logs = set(glob.glob(os.path.join(tempfile.gettempdir(), "clipdet-ray-*.log")))
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    make_image(tmp_path / "x.png")
    t0 = time.time()
    r = run_cli("extract", tmp_path / "x.png", "-b", tiny_spec, "-c", tmp_path / "c.h5", "--engine", "ray",
                "--ray-address", f"127.0.0.1:{port}")
    assert r.exit_code == 2
    assert r.stderr.startswith(f"clipdet: error: Ray cluster 127.0.0.1:{port}: cannot connect"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and time.time() - t0 < 60
    r = run_cli("extract", tmp_path / "x.png", "-b", tiny_spec, "-c", tmp_path / "c.h5", "--engine", "spark")
    assert r.exit_code == 2 and "--engine 'spark': expected one of local, ray" in r.stderr
    missing = tmp_path / "no-such-weights.safetensors"
    r = run_cli("extract", tmp_path / "x.png", "-b", f"clipdet-tiny:{missing}", "-c", tmp_path / "c.h5",
                "--engine", "ray", "--ray-address", cluster.address)
    assert r.exit_code == 2
    assert r.stderr == f"clipdet: error: backbone 'clipdet-tiny:{missing}': weights file {missing} not found\n"
    # options the actors' model refuses: the local engine's line, not Ray's wrapper of it
    for opt, line in ((["--heads", "99"], "--heads 99: expected a number of final blocks from 1 to 2"),
                      (["--layers", "50"], "--layers 50"), (["--precision", "fp16"], "fp16")):
        r = run_cli("extract", tmp_path / "x.png", "-b", tiny_spec, "-c", tmp_path / "c.h5", "--engine", "ray",
                    "--ray-address", cluster.address, *opt)
        assert r.exit_code == 2 and r.stderr.startswith("clipdet: error: ") and line in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Ray" not in r.stderr, r.stderr
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "clipdet-ray-*.log"))) == logs


def test_help_does_not_import_ray(subprocess_env):
    """`clipdet --help` and the local engine never import Ray."""
    code = ("import sys; from clipdet.cli import app; import clipdet.extract.run, clipdet.extract.engines; "
            "print('ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


def test_progress_bar_on_the_driver(cluster, tmp_path, tiny_spec, subprocess_env):
    """On a terminal the Ray engine shows the same tqdm bar as the local engine, driven from the driver.

    No --ray-address while another Ray (the fixture's cluster) runs on this machine: the run starts its
    own local Ray rather than joining that one (plain ray.init() would, and refuse our store size)."""
    import fcntl
    import pty
    import struct
    import termios

    tree = _tree(tmp_path / "tree", 6, bad=False)
    cmd = CLIPDET + ["extract", str(tree), "-b", tiny_spec, "-c", str(tmp_path / "c.h5"), "--engine", "ray"]
    subprocess_env = {k: v for k, v in subprocess_env.items() if k != "RAY_ADDRESS"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command on a 120-column terminal (never back into pytest)
        try:
            os.execve(cmd[0], cmd, subprocess_env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    out = b""
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "extract: 100%" in text and "6/6" in text, text  # tqdm's bar, updated as rows reach the driver
    assert "6 new, 0 skipped" in text
