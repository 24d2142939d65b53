"""The head registry, filled on first use: names → head classes, and what each head reads.

Importing clipdet (or `clipdet.detectors`, or a `Detector`) imports no head module: scikit-learn,
torch and faiss load when a head is first created, listed or rebuilt from a detector file.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import DetectorFileError, UsageError


def heads_registry():
    """The registry with every built-in head registered (importing the head modules registers them)."""
    from . import centroid, heads, knn, layers, linear, mlp, zeroshot  # noqa: F401
    from .base import HEADS

    return HEADS


def head_kind(head: str) -> str:
    """The feature kind head `head` reads (its class attribute ``needs``)."""
    return getattr(heads_registry().get(head), "needs", "embedding")


def kinds_for(heads: Iterable[str]) -> list[str]:
    """The feature kinds a set of heads needs, "embedding" first."""
    out = ["embedding"]
    for h in heads:
        if h == "auto":  # fit --head auto: reads what the cache holds (clipdet.fit.run.auto_kinds)
            continue
        k = head_kind(h)
        if k not in out:
            out.append(k)
    return out


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return heads_registry().names()


def head_params(name: str) -> dict:
    """Parameters of head ``name`` with their defaults (``get_params`` of a default instance)."""
    return heads_registry().get(name)().get_params(deep=False)


def head_description(name: str) -> str:
    """One-line description of head ``name`` (first line of its class docstring)."""
    return heads_registry().get(name).describe()


def describe_heads() -> list[tuple[str, str, dict]]:
    """``(name, description, default params)`` of every head, for a ``clipdet heads`` listing."""
    return [(n, head_description(n), head_params(n)) for n in list_heads()]


def create_head(name: str, **params):
    """A new, unfitted head ``name`` with ``params``; unknown names or parameters raise `UsageError`."""
    cls = heads_registry().get(name)
    valid = cls().get_params(deep=False)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UsageError(
            f"unknown parameter(s) for head {name!r}: {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    return cls(**params)


def head_from_state(meta: dict, arrays: dict):
    """Rebuild a fitted head from ``get_state()`` output, dispatching on ``meta["head"]``."""
    heads = heads_registry()
    name = meta.get("head") if isinstance(meta, dict) else None
    if not isinstance(name, str) or name not in heads:
        raise DetectorFileError(f"head state names an unknown head {name!r}; known: {', '.join(heads.names())}")
    return heads.get(name).from_state(meta, arrays)
