"""The suite writes nothing into the checkout: the default cache is a throwaway folder, and the guard in
conftest.py (`checkout_snapshot` / `checkout_changes`) names files a test created or changed."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import REPO, checkout_changes, checkout_snapshot


def test_default_cache_of_the_suite_is_outside_the_checkout():
    from clipdet.cache import default_cache_path

    path = Path(default_cache_path()).resolve()
    assert REPO not in path.parents, path


def test_guard_names_new_changed_and_removed_files_but_not_tool_caches(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".gitkeep").write_text("")
    (tmp_path / "README.md").write_text("x")
    (tmp_path / "gone.txt").write_text("x")
    before = checkout_snapshot(tmp_path)
    (tmp_path / "cache" / "clipdet.h5").write_bytes(b"rows")
    (tmp_path / "README.md").write_text("changed")
    os.utime(tmp_path / "README.md", ns=(1, 1))
    (tmp_path / "gone.txt").unlink()
    for tool in ("__pycache__", ".pytest_cache", "clipdet.egg-info"):
        (tmp_path / tool).mkdir()
        (tmp_path / tool / "x").write_text("y")
    assert checkout_changes(before, checkout_snapshot(tmp_path)) == [
        "README.md (changed)", os.path.join("cache", "clipdet.h5") + " (new)", "gone.txt (removed)"]
