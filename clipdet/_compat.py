"""Module paths of clipdet 0.2 that moved in 0.3's stage layout, kept importable.

`import clipdet.images`, `from clipdet.fewshot import fit` and the like still work: a meta-path finder
answers each old name with a module whose attributes are looked up, on first use, in the modules that
now hold them (a `DeprecationWarning` names the new place). Nothing here is imported by clipdet's own
code; the table below is the whole mapping, and `tests/test_layout.py` checks that every old name
resolves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

#: old module → the modules that now hold its names, searched in order.
MOVED: dict[str, tuple[str, ...]] = {
    "clipdet.attribution": ("clipdet.detectors.openset",),
    "clipdet.calibration": ("clipdet.detectors.calibration",),
    "clipdet.cli_bench": ("clipdet.evaluate.pools", "clipdet.cli.bench"),
    "clipdet.cli_cache": ("clipdet.cli.cache",),
    "clipdet.detector": ("clipdet.detectors.detector",),
    "clipdet.engine": ("clipdet.extract.engines",),
    "clipdet.engine.ray_driver": ("clipdet.extract.engines.ray_driver",),
    "clipdet.engine.ray_stages": ("clipdet.extract.engines.ray_stages",),
    "clipdet.features": ("clipdet.detectors.features", "clipdet.detectors.registry", "clipdet.fit.pools",
                         "clipdet.score.plan"),
    "clipdet.fewshot": ("clipdet.fit.config", "clipdet.fit.shots", "clipdet.fit.pools", "clipdet.fit.head",
                        "clipdet.fit.run"),
    "clipdet.images": ("clipdet.extract.discover", "clipdet.extract.decode", "clipdet.extract.views"),
    "clipdet.metrics": ("clipdet.evaluate.metrics", "clipdet.evaluate.stats"),
    "clipdet.preprocess": ("clipdet.backbones.preprocess",),
    "clipdet.protocols": ("clipdet.evaluate.common", "clipdet.evaluate.kshot", "clipdet.evaluate.logo",
                          "clipdet.evaluate.robustness", "clipdet.evaluate.shortcut", "clipdet.evaluate.record",
                          "clipdet.evaluate.bench"),
    "clipdet.prune": ("clipdet.detectors.prune", "clipdet.fit.prune"),
    "clipdet.refcv": ("clipdet.detectors.refcv",),
    "clipdet.report": ("clipdet.evaluate.plots", "clipdet.evaluate.report"),
    "clipdet.scoring": ("clipdet.score.stream", "clipdet.score.output"),
    "clipdet.text.fitting": ("clipdet.fit.text",),
}


class _Moved(types.ModuleType):
    """An old module path: attribute look-ups go to the modules that now hold the names."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Moved in clipdet 0.3 to {', '.join(targets)}.")
        self._targets = targets

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            mod = importlib.import_module(target)
            if hasattr(mod, attr):
                return getattr(mod, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._targets)}) has no "
                             f"attribute {attr!r}")

    def __dir__(self):
        names = set()
        for target in self._targets:
            names.update(n for n in dir(importlib.import_module(target)) if not n.startswith("__"))
        return sorted(names)


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths in `MOVED` (and only those); the new modules are imported on first use."""

    def find_spec(self, fullname, path=None, target=None):
        """A spec for an old module path, else None (the normal finders go on)."""
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=any(k.startswith(fullname + ".")
                                                                               for k in MOVED))

    def create_module(self, spec):
        """The forwarding module of an old path."""
        warnings.warn(f"{spec.name} moved in clipdet 0.3 to {', '.join(MOVED[spec.name])}; import it from there",
                      DeprecationWarning, stacklevel=3)
        mod = _Moved(spec.name, MOVED[spec.name])
        if spec.submodule_search_locations is not None:
            mod.__path__ = []
        return mod

    def exec_module(self, module):
        """Nothing to run: names are looked up when used."""


def install() -> None:
    """Put the finder on `sys.meta_path` once."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
