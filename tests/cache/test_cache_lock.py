"""A reader kept waiting behind a lock held by a stopped process says so, with the holder's pid, then
goes on waiting (#21 item 21)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_cache import shard

from clipdet.cache import FeatureCache
from clipdet.cache.files import LOCK_NOTICE_ENV

HOLD = ("import os, signal, sys; from clipdet.cache.files import flock\n"
        "with flock(sys.argv[1], exclusive=True):\n"
        "    print('held', flush=True); os.kill(os.getpid(), signal.SIGSTOP)\n")


@pytest.mark.slow
def test_reader_behind_a_stopped_writer_names_it_and_keeps_waiting(tmp_path, subprocess_env):
    fc = FeatureCache(tmp_path / "c.h5")
    shard(fc, [1])
    holder = subprocess.Popen([sys.executable, "-c", HOLD, fc.lock_path], env=subprocess_env,
                              stdout=subprocess.PIPE, text=True)
    reader = None
    try:
        assert holder.stdout.readline().strip() == "held"
        reader = subprocess.Popen([sys.executable, "-m", "clipdet", "cache", "info", "--cache", fc.path],
                                  env={**subprocess_env, LOCK_NOTICE_ENV: "0.5"}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and reader.poll() is None:
            time.sleep(0.2)
            if time.time() > deadline - 50:  # ~10 s: long enough for the notice
                break
        assert reader.poll() is None  # still waiting
        os.kill(holder.pid, signal.SIGCONT)
        holder.wait(timeout=30)
        out, err = reader.communicate(timeout=60)
    finally:
        for p in (holder, reader):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    assert reader.returncode == 0 and "1 images" in out, err
    notes = [ln for ln in err.splitlines() if "waited" in ln]
    assert len(notes) == 1 and f"pid {holder.pid}, stopped" in notes[0] and fc.lock_path in notes[0], err
    assert "still waiting" in notes[0] and f"kill -CONT {holder.pid}" in notes[0]
