"""Detector bundles: round trip, determinism and refusal of damaged or foreign files."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from clipdet import persist
from clipdet.errors import DetectorFileError, UsageError
from clipdet.persist import load_bundle, save_bundle

META = {"head": "logistic", "threshold": 0.25, "classes": ["real", "fake"], "backbone": "ViT-B-32:openai",
        "nested": {"b": 1, "a": [1.5, None, True]}, "unicode": "café"}


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "coef": rng.normal(size=(3, 8)).astype(np.float32),
        "bank": rng.normal(size=(5, 8)).astype(np.float16),
        "f64": rng.normal(size=4),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "u8": np.arange(250, 256, dtype=np.uint8),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 8), dtype=np.float32),
        "empty1d": np.zeros(0, dtype=np.int64),
        "scalar": np.array(3.5),
    }


def _header(raw: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _rewrite_header(raw: bytes, header: dict) -> bytes:
    n, _ = _header(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def test_round_trip(tmp_path):
    arrays = _arrays()
    path = save_bundle(tmp_path / "det.clipdet", META, arrays)
    assert path == tmp_path / "det.clipdet"
    meta, loaded = load_bundle(path)
    assert meta == json.loads(json.dumps(META))
    assert set(loaded) == set(arrays)
    for name, a in arrays.items():
        assert loaded[name].dtype == a.dtype, name
        assert loaded[name].shape == a.shape, name
        np.testing.assert_array_equal(loaded[name], a)


def test_is_plain_safetensors(tmp_path):
    from safetensors.numpy import load_file

    path = save_bundle(tmp_path / "det.clipdet", META, _arrays())
    plain = load_file(str(path))
    np.testing.assert_array_equal(plain["coef"], _arrays()["coef"])
    _, header = _header(path.read_bytes())
    env = json.loads(header["__metadata__"]["clipdet"])
    assert env["format"] == "clipdet-detector" and env["format_version"] == 1
    assert env["meta"]["head"] == "logistic" and re.fullmatch(r"[0-9a-f]{64}", env["sha256"])


def test_numpy_scalars_and_byte_order(tmp_path):
    meta = {"t": np.float32(0.5), "k": np.int64(7), "flag": np.bool_(True)}
    arrays = {"be": np.arange(4, dtype=">f8"), "strided": np.arange(12.0).reshape(3, 4)[:, ::2]}
    m, a = load_bundle(save_bundle(tmp_path / "x", meta, arrays))
    assert m == {"t": 0.5, "k": 7, "flag": True}
    np.testing.assert_array_equal(a["be"], np.arange(4.0))
    np.testing.assert_array_equal(a["strided"], arrays["strided"])


def test_deterministic_bytes(tmp_path):
    meta_reordered = dict(reversed(list(META.items())))
    arrays_reordered = dict(reversed(list(_arrays().items())))
    a = save_bundle(tmp_path / "a", META, _arrays()).read_bytes()
    b = save_bundle(tmp_path / "b", meta_reordered, arrays_reordered).read_bytes()
    assert a == b


def test_deterministic_across_processes(tmp_path):
    # safetensors keeps its metadata in a hash map; several keys would come out in random order
    import subprocess
    import sys

    code = (
        "import numpy as np, sys; from clipdet.persist import save_bundle;"
        "save_bundle(sys.argv[1], {'z': 1, 'a': 2, 'm': [3]}, {'w': np.arange(3.0), 'b': np.ones(2, bool)})"
    )
    root = Path(__file__).resolve().parents[1]
    outs = []
    for i in range(3):
        p = tmp_path / f"p{i}"
        subprocess.run([sys.executable, "-c", code, str(p)], check=True, cwd=root)
        outs.append(p.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_atomic_no_temp_left(tmp_path):
    save_bundle(tmp_path / "sub" / "det.clipdet", META, _arrays())
    save_bundle(tmp_path / "sub" / "det.clipdet", META, {"x": np.zeros(2)})  # overwrite
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["det.clipdet"]
    _, arrays = load_bundle(tmp_path / "sub" / "det.clipdet")
    assert list(arrays) == ["x"]


def test_missing_file(tmp_path):
    with pytest.raises(DetectorFileError, match="nope.clipdet: no such file"):
        load_bundle(tmp_path / "nope.clipdet")


def test_directory_refused(tmp_path):
    with pytest.raises(DetectorFileError, match="directory"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 8, 30, -1])
def test_truncated_refused(tmp_path, keep):
    path = save_bundle(tmp_path / "det.clipdet", META, _arrays())
    raw = path.read_bytes()
    cut = tmp_path / "cut.clipdet"
    cut.write_bytes(raw[:keep] if keep >= 0 else raw[:-3])
    with pytest.raises(DetectorFileError, match=r"cut\.clipdet: (empty|truncated)") as e:
        load_bundle(cut)
    assert "\n" not in str(e.value)


def test_not_safetensors_refused(tmp_path):
    for name, data in [("img.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100), ("text.json", b'{"a": 1}\n' * 10),
                       ("pickle.pkl", b"\x80\x04\x95" + b"\0" * 64)]:
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(DetectorFileError, match=re.escape(name) + ": not a safetensors file"):
            load_bundle(p)


def test_foreign_safetensors_refused(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(p))
    with pytest.raises(DetectorFileError, match="not a clipdet file"):
        load_bundle(p)


def test_flipped_array_byte_refused(tmp_path):
    path = save_bundle(tmp_path / "det.clipdet", META, _arrays())
    raw = bytearray(path.read_bytes())
    n, header = _header(bytes(raw))
    start, _ = header["coef"]["data_offsets"]
    raw[8 + n + start + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DetectorFileError, match="det.clipdet: checksum mismatch"):
        load_bundle(path)


def test_last_byte_flipped_refused(tmp_path):
    path = save_bundle(tmp_path / "det.clipdet", META, _arrays())
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DetectorFileError, match="checksum mismatch"):
        load_bundle(path)


def test_edited_metadata_refused(tmp_path):
    path = save_bundle(tmp_path / "det.clipdet", META, _arrays())
    raw = path.read_bytes()
    _, header = _header(raw)
    env = json.loads(header["__metadata__"]["clipdet"])
    env["meta"]["threshold"] = -5.0
    header["__metadata__"]["clipdet"] = json.dumps(env)
    path.write_bytes(_rewrite_header(raw, header))
    with pytest.raises(DetectorFileError, match="checksum mismatch"):
        load_bundle(path)


def test_edited_array_shape_refused(tmp_path):
    path = save_bundle(tmp_path / "det.clipdet", META, _arrays())
    raw = path.read_bytes()
    _, header = _header(raw)
    header["coef"]["shape"] = [8, 3]  # same bytes, different shape
    path.write_bytes(_rewrite_header(raw, header))
    with pytest.raises(DetectorFileError, match="checksum mismatch"):
        load_bundle(path)


def test_newer_version_refused(tmp_path):
    path = save_bundle(tmp_path / "det.clipdet", META, _arrays(), version=2)
    with pytest.raises(DetectorFileError, match="newer clipdet.*upgrade"):
        load_bundle(path)
    meta, _ = load_bundle(path, max_version=2)
    assert meta["head"] == "logistic"


def test_version_lowered_by_edit_refused(tmp_path):
    path = save_bundle(tmp_path / "det.clipdet", META, _arrays(), version=2)
    raw = path.read_bytes()
    _, header = _header(raw)
    env = json.loads(header["__metadata__"]["clipdet"])
    env["format_version"] = 1
    header["__metadata__"]["clipdet"] = json.dumps(env)
    path.write_bytes(_rewrite_header(raw, header))
    with pytest.raises(DetectorFileError, match="checksum mismatch"):
        load_bundle(path)


def test_wrong_kind_refused(tmp_path):
    path = save_bundle(tmp_path / "thing", META, _arrays(), kind="clipdet-something-else")
    with pytest.raises(DetectorFileError, match="wrong kind.*clipdet-something-else.*clipdet-detector"):
        load_bundle(path)
    meta, _ = load_bundle(path, kind="clipdet-something-else")
    assert meta["head"] == "logistic"


@pytest.mark.parametrize(
    "arrays",
    [
        {"names": np.array(["a", "b"])},
        {"obj": np.array([object()], dtype=object)},
        {"c": np.zeros(2, dtype=np.complex64)},
        {"i16": np.zeros(2, dtype=np.int16)},
        {"list": [1, 2, 3]},
        {"": np.zeros(2)},
        {"__metadata__": np.zeros(2)},
    ],
)
def test_bad_arrays_rejected(tmp_path, arrays):
    with pytest.raises(UsageError):
        save_bundle(tmp_path / "x", {}, arrays)
    assert not list(tmp_path.iterdir())


def test_bad_meta_rejected(tmp_path):
    with pytest.raises(UsageError, match="JSON"):
        save_bundle(tmp_path / "x", {"a": object()}, {})
    with pytest.raises(UsageError):
        save_bundle(tmp_path / "x", [1, 2], {})  # type: ignore[arg-type]


def test_no_code_execution_imports():
    src = Path(persist.__file__).read_text()
    for mod in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "torch", "marshal", "shelve"):
        assert not re.search(rf"^\s*(import|from)\s+{mod}\b", src, re.MULTILINE), mod
        assert not re.search(rf"\b{mod}\.load", src), mod
    assert not re.search(r"\b(eval|exec)\(", src)
    assert "allow_pickle" not in src
