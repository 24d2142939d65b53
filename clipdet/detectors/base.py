"""Shared base class and registry of the few-shot detector heads (scikit-learn classifiers).

Contract of every head (see `BaseHead`):

* ``__init__`` only stores parameters; fitted attributes end in ``_``; ``classes_`` is sorted.
* ``decision_function(X)``: shape (n,) for two classes, higher = more likely ``classes_[1]``
  (clipdet: y=1 fake, so higher = more likely generated); shape (n, n_classes) otherwise.
* ``predict``: ``classes_[decision > 0]`` (binary) or the arg-max column (multi-class).
* ``predict_proba``: calibrated. Binary: ``sigmoid(a * decision)`` with the slope ``a`` fitted by
  Platt scaling on cross-validated decision values of the training data (class-balanced sample
  weights, Platt's smoothed targets). Multi-class: ``softmax(a * decision)`` with ``a`` fitted the
  same way (temperature scaling, a one-parameter multi-class Platt). Platt's intercept is pinned
  to 0 so that ``predict``, the sign of ``decision_function`` and the arg-max of ``predict_proba``
  always agree (the scikit-learn classifier contract); the heads are trained class-balanced, so
  0 is their natural threshold and the probabilities are calibrated for equal class priors.
  With fewer than `MIN_PER_CLASS_FOR_CV` samples in some class, or ``calibration_cv < 2``, a fixed
  per-head slope is used instead (``calibration_method_ == "fixed"``).
* Persistence without pickle: ``get_state() -> (meta, arrays)`` (JSON-able dict, dict of numpy
  arrays for safetensors) and ``from_state(meta, arrays)``, which rebuilds a head whose outputs are
  bit-identical.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from ..errors import DetectorFileError, UsageError
from ..registry import Registry
from .calibration import apply_temperature, cross_val_decision, fit_platt, fit_temperature, sigmoid

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _sk_validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    _sk_validate_data = None

__all__ = ["HEADS", "MIN_PER_CLASS_FOR_CV", "STATE_FORMAT", "BaseHead", "l2_normalize"]

HEADS: Registry = Registry("head")
"""Registry of head classes by name (``svm``, ``logreg``, ``mlp``, ``knn``, ``centroid``, ``zeroshot``)."""

MIN_PER_CLASS_FOR_CV = 3
"""Smallest per-class sample count for which predict_proba is Platt-calibrated on CV scores."""

STATE_FORMAT = 1
"""Version of the ``get_state`` layout; `from_state` refuses newer ones."""

_MIN_SLOPE = 1e-6  # calibrated slope floor: keeps probabilities monotone in the decision


def l2_normalize(X, dtype=np.float64) -> np.ndarray:
    """Rows of ``X`` scaled to unit L2 norm (all-zero rows stay zero), as ``dtype``."""
    X = np.asarray(X, dtype=dtype)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, np.finfo(dtype).tiny)


_NO_Y = "no_validation"


def _validate(est, X, y=_NO_Y, *, reset: bool):
    """scikit-learn's input validation (float64/float32, finite, n_features_in_ bookkeeping)."""
    kw = {"dtype": (np.float64, np.float32), "reset": reset}
    if _sk_validate_data is not None:
        return _sk_validate_data(est, X, y, **kw)
    return est._validate_data(X, y, **kw)  # pragma: no cover - scikit-learn < 1.6


def _encode_classes(classes: np.ndarray) -> tuple[list, str]:
    if classes.dtype.kind in "iub":
        return [int(c) for c in classes], classes.dtype.str
    if classes.dtype.kind == "f":
        return [float(c) for c in classes], classes.dtype.str
    if classes.dtype.kind == "U":
        return [str(c) for c in classes], classes.dtype.str
    if classes.dtype.kind == "O" and all(isinstance(c, str) for c in classes):
        return [str(c) for c in classes], "object"
    raise UsageError("only integer or string class labels can be saved")


def _decode_classes(values: list, dtype: str) -> np.ndarray:
    if dtype == "object":
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.asarray(values, dtype=np.dtype(dtype))


class BaseHead(ClassifierMixin, BaseEstimator):
    """Base class of clipdet heads: fit/decision/predict/calibrated proba and state round trip.

    Subclasses implement ``_fit_core(X, y_idx)`` (``y_idx`` indexes ``classes_``),
    ``_decision(X) -> (n, n_classes)`` or ``(n,)`` for two classes, ``_state_arrays()``,
    ``_state_meta()`` and ``_load_state(meta, arrays)``, and declare ``calibration_cv``.
    """

    _head_name: ClassVar[str] = ""
    _fixed_slope: ClassVar[float] = 1.0  # slope of the fixed sigmoid used without CV calibration
    #: the feature kind the head reads (clipdet.detectors.features): "embedding", "heads" or "layers"
    needs: ClassVar[str] = "embedding"
    #: whether `fit` accepts ``groups`` (the references' generator names), for choices made by CV
    uses_groups: ClassVar[bool] = False

    def layout_params(self, layout: dict) -> dict:
        """Parameters that tell the head how its flat feature rows are laid out (none by default)."""
        return {}

    def describe_fit(self, layout: dict) -> list[str]:
        """Lines saying what a fitted head relies on (e.g. the chosen attention heads); none by default."""
        return []

    # ---- fitting ---------------------------------------------------------------------------
    def fit(self, X, y):
        """Fit the head on embeddings ``X`` (n, d) and labels ``y`` (int or str), then calibrate."""
        X, y = _validate(self, X, y, reset=True)
        check_classification_targets(y)
        classes, y_idx = np.unique(y, return_inverse=True)
        if classes.size < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes; got only one class: {classes[0]!r}"
            )
        self._check_params()
        self.classes_ = classes
        self._fit_core(X, y_idx)
        self._fit_calibration(X, y, y_idx)
        return self

    def _check_params(self) -> None:
        cv = self.calibration_cv
        if isinstance(cv, (bool, np.bool_)) or not isinstance(cv, (int, np.integer)) or cv < 0:
            raise ValueError(f"calibration_cv must be an int >= 0, got {cv!r}")

    def _seed(self) -> int:
        rs = getattr(self, "random_state", 0)
        if rs is None:
            return int(np.random.default_rng().integers(2**31 - 1))
        if isinstance(rs, (int, np.integer)) and not isinstance(rs, bool):
            return int(rs)
        if isinstance(rs, np.random.RandomState):
            return int(rs.randint(2**31 - 1))
        raise ValueError(f"random_state must be None, an int or a RandomState, got {rs!r}")

    def _fit_calibration(self, X, y, y_idx) -> None:
        counts = np.bincount(y_idx, minlength=self.classes_.size)
        if self.calibration_cv >= 2 and counts.min() >= MIN_PER_CLASS_FOR_CV:
            inner = clone(self).set_params(calibration_cv=0)
            oof = cross_val_decision(inner, X, y, n_splits=self.calibration_cv, random_state=self._seed())
            w = (y_idx.size / (counts.size * counts))[y_idx]  # class-balanced
            if self.classes_.size == 2:
                a, _ = fit_platt(oof, y_idx, fit_intercept=False, sample_weight=w)
            else:
                a = fit_temperature(oof, y_idx, sample_weight=w)
            self.calibration_slope_ = float(max(a, _MIN_SLOPE))
            self.calibration_method_ = "cv"
        else:
            self.calibration_slope_ = float(self._fixed_slope)
            self.calibration_method_ = "fixed"

    # ---- inference -------------------------------------------------------------------------
    def decision_function(self, X) -> np.ndarray:
        """Scores: (n,) for two classes (higher = ``classes_[1]``), else (n, n_classes)."""
        check_is_fitted(self)
        X = _validate(self, X, reset=False)
        return self._decision(X)

    def predict(self, X) -> np.ndarray:
        """Predicted labels (same type as ``classes_``)."""
        d = self.decision_function(X)
        if d.ndim == 1:
            return self.classes_[(d > 0).astype(np.intp)]
        return self.classes_[np.argmax(d, axis=1)]

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated class probabilities, shape (n, n_classes), columns in ``classes_`` order."""
        d = self.decision_function(X)
        if d.ndim == 1:
            p = sigmoid(self.calibration_slope_ * d)
            return np.column_stack([1.0 - p, p])
        return apply_temperature(d, self.calibration_slope_)

    def predict_log_proba(self, X) -> np.ndarray:
        """Logarithm of `predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    # ---- persistence -----------------------------------------------------------------------
    def get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """``(meta, arrays)``: JSON-able metadata (params, classes, calibration) and numpy arrays."""
        check_is_fitted(self)
        params = {k: v.item() if isinstance(v, np.generic) else v for k, v in self.get_params(deep=False).items()}
        try:
            ok = json.loads(json.dumps(params)) == params
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"parameters of {self._head_name!r} are not JSON-able, cannot save: {params!r}")
        classes, dtype = _encode_classes(np.asarray(self.classes_))
        meta = {
            "format": STATE_FORMAT,
            "head": self._head_name,
            "params": params,
            "classes": classes,
            "classes_dtype": dtype,
            "n_features_in": int(self.n_features_in_),
            "calibration": {"method": self.calibration_method_, "slope": self.calibration_slope_},
            "fitted": self._state_meta(),
        }
        arrays = {k: np.ascontiguousarray(v) for k, v in self._state_arrays().items()}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> BaseHead:
        """Rebuild a fitted head from `get_state` output; `DetectorFileError` if it does not fit."""
        try:
            if int(meta.get("format", -1)) > STATE_FORMAT:
                raise DetectorFileError(
                    f"head state format {meta['format']} is newer than supported ({STATE_FORMAT})"
                )
            if meta["head"] != cls._head_name:
                raise DetectorFileError(f"state is for head {meta['head']!r}, not {cls._head_name!r}")
            head = cls(**meta["params"])
            head.classes_ = _decode_classes(meta["classes"], meta["classes_dtype"])
            head.n_features_in_ = int(meta["n_features_in"])
            head.calibration_method_ = str(meta["calibration"]["method"])
            head.calibration_slope_ = float(meta["calibration"]["slope"])
            head._load_state(meta.get("fitted", {}), arrays)
        except DetectorFileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DetectorFileError(f"malformed {cls._head_name!r} head state: {exc}") from exc
        return head

    @staticmethod
    def _require(arrays: dict, name: str, shape: tuple, ndim: int | None = None) -> np.ndarray:
        """Fetch ``arrays[name]`` and check its shape (None entries match anything)."""
        if name not in arrays:
            raise DetectorFileError(f"head state lacks array {name!r}")
        a = np.asarray(arrays[name])
        if a.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
            raise DetectorFileError(f"array {name!r} has shape {a.shape}, expected {shape}")
        return a

    # ---- hooks -----------------------------------------------------------------------------
    def _fit_core(self, X: np.ndarray, y_idx: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decision(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _state_arrays(self) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _state_meta(self) -> dict[str, Any]:
        return {}

    def _load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        """One-line description: the first line of the class docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else ""
