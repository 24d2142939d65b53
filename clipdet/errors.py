"""Exceptions raised by clipdet; the CLI turns them into one-line messages and exit codes."""

from __future__ import annotations


class ClipdetError(Exception):
    """Base class for every error clipdet reports to users (exit code 2 from the CLI)."""

    exit_code = 2


class UsageError(ClipdetError):
    """Bad arguments or options (unknown backbone, malformed view, missing labels)."""


class NoImagesError(UsageError):
    """The inputs hold no image at all (an empty folder, an empty list): exit code 1, nothing written."""

    exit_code = 1


class BackboneError(ClipdetError):
    """A backbone could not be built or its weights could not be loaded."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights cannot be fetched (no network) and no local file was given."""


class CacheError(ClipdetError):
    """The feature cache is unreadable or inconsistent."""


class CacheMismatchError(CacheError):
    """Features in the cache were made differently (weights, preprocessing) from the ones requested."""


class DetectorFileError(ClipdetError):
    """A detector file is truncated, edited, from a newer format version, or otherwise unreadable."""


class OverlapError(ClipdetError):
    """Evaluation images overlap the detector's reference images."""


class ImageError(ClipdetError):
    """One input file could not be decoded; carries the path and a short reason.

    Never stops a run: extract/score record it and go on.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class MissingDependencyError(UsageError):
    """An optional dependency (an extra of clipdet) is not installed."""


def require(module: str, extra: str, what: str):
    """Import and return `module`, or raise one line saying that `what` needs the `extra` of clipdet."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{what} needs {module} (not installed here): "
                                     f"pip install 'clipdet[{extra}]'") from None
