"""Writing side of FeatureCache beyond one batch: the catalogue update, v1 upgrade, orphan adoption,
tiered merges (merge.py does the file work), damaged segments set aside.

A mixin of FeatureCache (store.py).
"""

from __future__ import annotations

import contextlib
import os
import time

from ..errors import CacheError
from . import catalogue
from .files import flock, fsync_dir, link, pid_alive, remove, removed_on_failure, replace, try_flock
from .segment import check_header, feature_groups


class MaintainMixin:
    """FeatureCache methods that change which segments are live."""

    def _update_catalogue(self, add: list[str] = (), replace: tuple[list[str], str] | None = None) -> list[str]:
        """Under the exclusive lock: upgrade a v1 cache, adopt orphan segments of dead writers, append
        `add`, or swap `replace` = (inputs, merge output named mrg-...). The merge output keeps its mrg-
        name: the catalogue write that names it is the one step that commits the merge (an mrg- file the
        catalogue does not name is never adopted, only deleted once its writer is dead), and the
        catalogue names the inputs as retired until they are deleted, so a kill at any point neither
        loses nor duplicates rows. Returns the new segment list."""
        with flock(self.lock_path, exclusive=True, create_dir=True):
            cat = catalogue.read(self.path)
            segs = self._upgrade_in_place(cat) if cat.legacy else list(cat.segments)
            segs = [s for s in segs if os.path.exists(s) or not os.path.exists(s + ".bad")]  # set aside meanwhile
            segs += [p for p in self._orphans(segs, cat.retired) if p not in add]
            retired: list[str] = []
            if replace is not None:
                inputs, output = replace
                if not all(s in segs for s in inputs):  # changed meanwhile (a repair): drop this merge
                    with contextlib.suppress(OSError):
                        remove(output)
                    catalogue.write(self.path, segs, cat.generation + 1)
                    return segs
                at = segs.index(inputs[0])
                segs = segs[:at] + [output] + [s for s in segs[at:] if s not in inputs]
                retired = list(inputs)
            segs += list(add)
            catalogue.write(self.path, segs, cat.generation + 1, retired=retired)
            for s in retired:
                with contextlib.suppress(OSError):
                    remove(s)
            return segs

    def _upgrade_in_place(self, cat) -> list[str]:
        """v1 → v2 without copying: hard-link the main file and shards into the segment folder."""
        os.makedirs(self.seg_dir, exist_ok=True)
        out = []
        for src in cat.segments:
            base = "seg-00000000000000000000-0-v1main.h5" if src == self.path else "seg-" + os.path.basename(src)
            dst = os.path.join(self.seg_dir, base)
            if not os.path.exists(dst):
                try:
                    link(src, dst)
                except OSError:
                    import shutil

                    tmp = f"{dst}.{os.getpid()}.tmp"
                    shutil.copyfile(src, tmp)
                    replace(tmp, dst)
            out.append(dst)
        fsync_dir(self.seg_dir)
        return out

    def _scan_orphans(self, live: list[str], retired: list[str] = ()) -> tuple[list[str], list[str]]:
        """(segments of dead writers missing from the catalogue, leftovers: segments the catalogue names as
        merged away, merge outputs and temp files of dead processes)."""
        junk = []
        parent = os.path.dirname(os.path.abspath(self.path))
        prefix = f".{os.path.basename(self.path)}."
        with contextlib.suppress(OSError):  # the catalogue's own temp file lives beside it
            for n in os.listdir(parent):
                pid = n[len(prefix):-len(".tmp")] if n.startswith(prefix) and n.endswith(".tmp") else ""
                if pid.isdigit() and not pid_alive(int(pid)):
                    junk.append(os.path.join(parent, n))
        if not os.path.isdir(self.seg_dir):
            return [], junk
        live_set, retired_set, adopt = set(live), set(retired), []
        for n in sorted(os.listdir(self.seg_dir)):
            p = os.path.join(self.seg_dir, n)
            parts = n.lstrip(".").split("-")
            if p in retired_set and p not in live_set:
                junk.append(p)
            elif p in live_set:
                continue
            elif n.startswith("seg-") and n.endswith(".h5"):
                if len(parts) >= 3 and parts[2].isdigit() and not pid_alive(int(parts[2])):
                    # clipdet <= 0.3 renamed a merge (m) or upgrade (u) output to seg-...-m00000.h5 before
                    # committing it: uncommitted, it only repeats live segments, so it is never adopted
                    (junk if len(parts) >= 4 and parts[3][:1] in ("m", "u") else adopt).append(p)
            elif n.startswith("mrg-") and len(parts) >= 2 and parts[1].isdigit() and not pid_alive(int(parts[1])):
                junk.append(p)  # a merge output no catalogue named: never committed
            elif n.endswith(".tmp"):
                pid = n.rsplit(".", 2)[-2] if n.count(".") >= 2 else ""
                if pid.isdigit() and not pid_alive(int(pid)):
                    junk.append(p)
        return adopt, junk

    def _orphans(self, live: list[str], retired: list[str] = ()) -> list[str]:
        """Adopt segments of killed writers (killed between writing and the catalogue update); remove
        merged-away segments and dead processes' merge outputs and temp files; set aside damaged orphans
        as *.bad."""
        import h5py

        adopt, junk = self._scan_orphans(live, retired)
        for p in junk:
            with contextlib.suppress(OSError):
                remove(p)
        good = []
        for p in adopt:
            try:
                with h5py.File(p, "r") as f:
                    check_header(f, p)
                good.append(p)
            except (OSError, CacheError):
                with contextlib.suppress(OSError):
                    replace(p, p + ".bad")
                self._warn(f"{p}: unreadable cache segment set aside as {os.path.basename(p)}.bad")
        return good

    def compact(self, full: bool = False, wait: bool = True) -> int:
        """Run tiered merges (or merge everything with `full`); returns how many segments were merged.
        Only one process merges at a time; with wait=False a busy merger makes this return 0 at once."""
        from . import merge

        if self.readonly:
            return 0
        os.makedirs(self.seg_dir, exist_ok=True)
        if full and catalogue.read(self.path).legacy:
            return self._upgrade_full()
        merged = 0
        lock = flock(self.merge_lock_path, exclusive=True) if wait else try_flock(self.merge_lock_path)
        with lock as held:
            if held is False and not wait:
                return 0
            segs = self._update_catalogue()
            while True:
                sizes = []
                for s in segs:
                    try:
                        sizes.append(os.path.getsize(s))
                    except OSError:
                        sizes.append(0)
                run = merge.plan(sizes, full=full)
                if run is None:
                    break
                inputs = segs[run[0]:run[1]]
                inputs, bad = self._openable(inputs)
                if bad:
                    segs = self._set_aside(bad)
                    continue
                out = self._merge(inputs)
                segs = self._update_catalogue(replace=(inputs, out))
                merged += len(inputs)
                if full:
                    break
        with contextlib.suppress(OSError):
            os.rmdir(self.pending_dir)
        return merged

    def auto_compact(self) -> int:
        """The merges a run does on its own: a failure (full disk, damaged segment) is a warning, never the
        end of a run whose batches are already safe."""
        try:
            return self.compact(wait=False)
        except (CacheError, OSError) as e:
            self._warn(f"{self.path}: merging segments failed ({e}); the cache stays readable as it is "
                       "(clipdet cache verify --repair, then clipdet cache compact)")
            return 0

    def _upgrade_full(self) -> int:
        """v1 → one v2 segment: merge the v1 file and shards into a new segment, then replace the v1
        file by the catalogue in one rename. Any failure before that leaves the v1 file untouched."""
        with flock(self.merge_lock_path, exclusive=True):
            cat = catalogue.read(self.path)
            if not cat.legacy:  # another process upgraded it meanwhile
                return 0
            out = self._merge(cat.segments)
            with flock(self.lock_path, exclusive=True, create_dir=True):
                now = catalogue.read(self.path)
                if not now.legacy or now.segments != cat.segments:  # a writer got in first: start again
                    with contextlib.suppress(OSError):
                        remove(out)
                    return 0
                catalogue.write(self.path, [out], 1)  # replaces the v1 file: the one committing step
                for s in cat.segments[1:]:
                    with contextlib.suppress(OSError):
                        remove(s)
            with contextlib.suppress(OSError):
                os.rmdir(self.pending_dir)
            return len(cat.segments)

    def _merge(self, inputs: list[str]) -> str:
        """Merge `inputs` into a new mrg- file (removed again on any failure); returns its path."""
        import h5py

        from .merge import merge_files

        out = os.path.join(self.seg_dir, f"mrg-{os.getpid()}-{time.time_ns():020d}.h5")
        files = []
        try:
            with removed_on_failure(out):
                files = [h5py.File(p, "r") for p in inputs]
                dropped = merge_files(files, out, replaces=inputs)
            if dropped:
                self._warn(f"{self.seg_dir}: {dropped} damaged feature row(s) left out while merging; their "
                           "images are re-extracted when next met")
        finally:
            for f in files:
                f.close()
        return out

    def _openable(self, paths: list[str]) -> tuple[list[str], list[str]]:
        import h5py

        good, bad = [], []
        for p in paths:
            try:
                with h5py.File(p, "r") as f:
                    check_header(f, p)
                    for key, view in feature_groups(f):
                        f[f"features/{key}/{view}/sha256"][()]
                good.append(p)
            except CacheError:
                raise
            except Exception:  # noqa: BLE001
                bad.append(p)
        return good, bad

    def _set_aside(self, bad: list[str]) -> list[str]:
        """Rename damaged segments to *.bad (never deleted) and drop them from the catalogue; a listed
        segment that is gone is only dropped (and said so)."""
        moved, gone, failed = [], [], []
        with flock(self.lock_path, exclusive=True, create_dir=True):
            cat = catalogue.read(self.path)
            segs = [s for s in cat.segments if s not in bad]
            for s in bad:  # renamed before the catalogue drops it: never re-adopted as an orphan
                try:
                    replace(s, s + ".bad")
                    moved.append(s)
                except FileNotFoundError:
                    gone.append(s)
                except OSError as e:
                    failed.append((s, e))
            catalogue.write(self.path, segs, cat.generation + 1)
        for s in moved:
            self._warn(f"{s}: unreadable cache segment set aside as {os.path.basename(s)}.bad")
        for s in gone:
            self._warn(f"{s}: cache segment missing; dropped from the catalogue (its images are re-extracted "
                       "when next met)")
        for s, e in failed:
            self._warn(f"{s}: unreadable cache segment dropped from the catalogue but not renamed ({e.strerror})")
        return segs

    def shard_count(self) -> int:
        """Segments a tiered merge would combine now (0 when the cache needs no merging)."""
        from . import merge

        segs = self.segments()
        sizes = [os.path.getsize(s) if os.path.exists(s) else 0 for s in segs]
        run = merge.plan(sizes)
        legacy = catalogue.read(self.path).legacy
        return (run[1] - run[0] if run else 0) + (len(segs) if legacy and len(segs) > 1 else 0)
