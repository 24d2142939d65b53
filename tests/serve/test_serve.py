"""clipdet serve: the HTTP API (TestClient, tiny model), limits, auth, metrics, micro-batching, the CLI."""

from __future__ import annotations

import asyncio
import csv
import io
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed (pip install 'clipdet[serve]')")

from fastapi.testclient import TestClient  # noqa: E402

import clipdet  # noqa: E402
from clipdet.cache import FeatureCache  # noqa: E402
from clipdet.detectors.detector import Detector  # noqa: E402
from clipdet.extract.decode import sha256_bytes  # noqa: E402
from clipdet.extract.discover import discover  # noqa: E402
from clipdet.extract.lazy import LazyBackbone  # noqa: E402
from clipdet.score.output import COLUMNS  # noqa: E402
from clipdet.serve import Engine, ServeOptions, check_bind, create_app  # noqa: E402
from clipdet.serve.app import hide_paths  # noqa: E402
from clipdet.serve.batcher import MicroBatcher  # noqa: E402
from clipdet.serve.security import bind_address, token_ok, url_host  # noqa: E402

TOKEN = "s3cret-token"
LOCAL = "http://127.0.0.1"  # the server answers loopback Host names only (DNS rebinding): not "testserver"


@pytest.fixture(scope="module")
def served(tmp_path_factory, make_image, tiny_spec, tiny_backbone):
    """(detector path, reference cache, folder of new uploads): a knn detector fitted on 4+4 references."""
    root = tmp_path_factory.mktemp("serve")
    for cls, gen, base in (("real", "a", 0), ("fake", "genA", 100), ("fake", "genB", 200)):
        for i, size in enumerate([(64, 64), (120, 90), (77, 140), (96, 60), (200, 150), (48, 80)]):
            sub = root / "tree" / cls / gen
            make_image(sub / f"{gen}_{i}{'.jpg' if i % 2 else '.png'}", size=size, seed=base + i, fake=cls == "fake")
    cache = str(root / "refs.h5")
    clipdet.extract(discover([str(root / "tree")]), tiny_spec, cache=cache,
                    lazy=LazyBackbone(tiny_spec, loaded=tiny_backbone))
    det_path = str(clipdet.fit(head="knn", shots=4, seed=0, cache=cache).save(root / "det.clipdet"))
    new = root / "new"
    make_image(new / "photo.jpg", size=(160, 120), seed=7)
    make_image(new / "render.png", size=(90, 130), seed=107, fake=True)
    make_image(new / "wide.png", size=(300, 64), seed=8)
    (new / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return det_path, cache, new


def _wait_ready(client, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = client.get("/healthz")
        if r.status_code == 200:
            return r.json()
        assert r.json()["status"] == "loading", r.text
        time.sleep(0.05)
    raise AssertionError("model did not load")


def _client(det_path, cache=None, cache_write=False, **opts):
    engine = Engine(Detector.load(det_path), cache=cache, cache_write=cache_write, device="cpu")
    return TestClient(create_app(engine, ServeOptions(**opts)), base_url=LOCAL)


def _files(*paths):
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


@pytest.fixture(scope="module")
def client(served):
    det_path, _, _ = served
    with _client(det_path, max_batch=8) as c:
        _wait_ready(c)
        yield c


def test_healthz_and_detector_metadata(client, served):
    assert client.get("/healthz").json()["status"] == "ok"
    meta = client.get("/v1/detector").json()
    det = Detector.load(served[0])
    arch, _, weights = det.backbone["spec"].partition(":")  # a weights file: its base name only
    assert meta["head"] == "knn" and meta["backbone"] == f"{arch}:{weights.rsplit('/', 1)[-1]}"
    assert meta["threshold"] == det.threshold and sorted(meta["generators"]) == ["genA", "genB"]
    assert meta["references"]["real"] == 4 and meta["references"]["total"] >= 8
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN


def test_scores_equal_clipdet_score_on_the_same_bytes(client, served, run_cli, tmp_path):
    det_path, _, new = served
    order = [new / "wide.png", new / "broken.png", new / "photo.jpg", new / "render.png"]
    r = client.post("/v1/score", files=_files(*order))
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert [row["path"] for row in rows] == [p.name for p in order]  # upload order, the uploaded name
    assert all(list(row) == COLUMNS + ["provenance_details"] for row in rows)
    bad = rows[1]
    assert bad["error"] and bad["label"] == "unknown" and bad["score"] is None and bad["sha256"]
    out = tmp_path / "offline.csv"
    res = run_cli("score", *[str(p) for p in order], "--detector", det_path, "--cache", str(tmp_path / "c.h5"),
                  "--out", str(out), "--device", "cpu")
    assert res.exit_code == 1, res.stderr  # the broken file
    offline = {row["sha256"]: row for row in csv.DictReader(io.StringIO(out.read_text()))}
    for row in rows:
        off = offline[row["sha256"]]
        if row["error"]:
            assert off["error"]
            continue
        assert not off["error"]
        assert f"{row['score']:.6g}" == off["score"] and f"{row['p_fake']:.6g}" == off["p_fake"]
        assert row["label"] == off["label"] and row["generator"] == off["generator"]
        assert row["nearest_path"] == off["nearest_path"].rsplit("/", 1)[-1]  # a base name: no server path
        assert f"{row['nearest_similarity']:.6g}" == off["nearest_similarity"]
    # exact equality of the full-precision values, through the library on the same bytes
    lib = {x["sha256"]: x for x in Detector.load(det_path).score_paths(
        [str(p) for p in order], cache=str(tmp_path / "c.h5"), device="cpu")}
    for row in rows:
        if not row["error"]:
            assert row["score"] == lib[row["sha256"]]["score"]
            assert row["p_fake"] == lib[row["sha256"]]["p_fake"]


def test_server_paths_are_hidden_unless_expose_paths(served):
    det_path, ref_cache, new = served
    ref = sorted((new.parent / "tree" / "real" / "a").iterdir())[0]
    with _client(det_path, cache=ref_cache) as c:
        _wait_ready(c)
        row = c.post("/v1/score", files=_files(ref)).json()["results"][0]
        meta = c.get("/v1/detector").json()
    assert row["nearest_path"] == ref.name and meta["cache"] == "refs.h5"
    assert str(new.parent) not in str(row) + str(meta)
    with _client(det_path, cache=ref_cache, expose_paths=True) as c:
        _wait_ready(c)
        row = c.post("/v1/score", files=_files(ref)).json()["results"][0]
        meta = c.get("/v1/detector").json()
    assert row["nearest_path"] == str(ref) and meta["cache"] == ref_cache
    assert hide_paths({"backbone": "ViT-B-32:/srv/w/b.safetensors", "cache": "/srv/c.h5"}) == {
        "backbone": "ViT-B-32:b.safetensors", "cache": "c.h5"}
    assert hide_paths({"backbone": "ViT-B-32:openai", "cache": None})["backbone"] == "ViT-B-32:openai"


def test_bad_uploads_are_per_file_errors(served, make_image, tmp_path):
    det_path, _, new = served
    big = make_image(tmp_path / "big.png", size=(400, 300), seed=3)
    engine = Engine(Detector.load(det_path), device="cpu", max_pixels=100_000)
    with TestClient(create_app(engine), base_url=LOCAL) as c:
        _wait_ready(c)
        files = _files(big, new / "photo.jpg") + [("files", ("empty.jpg", b"", "image/jpeg")),
                                                  ("files", ("../../etc/passwd", b"root:x:0:0", "text/plain"))]
        rows = c.post("/v1/score", files=files).json()["results"]
    assert "too many pixels" in rows[0]["error"]
    assert rows[1]["error"] is None and rows[1]["label"] in ("real", "fake")
    assert "empty" in rows[2]["error"]
    assert rows[3]["path"] == "passwd" and "not an image" in rows[3]["error"]  # a label, never a server path


def test_request_errors_are_json_without_traceback(client, served):
    _, _, new = served
    r = client.post("/v1/score", json={"path": "/etc/passwd"})
    assert r.status_code == 415 and "multipart" in r.json()["error"]
    r = client.post("/v1/score", data={"note": "no file"}, files=[("other", ("x.png", b"abc", "image/png"))])
    assert r.status_code == 422 and "files" in r.json()["error"]
    r = client.post("/v1/score", content=b"--xx\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert r.status_code in (400, 422) and "error" in r.json()
    assert client.get("/v1/nothing").status_code == 404
    for resp in (r, client.get("/v1/nothing")):
        assert "Traceback" not in resp.text


def test_body_over_limit_is_413_before_it_is_read(served):
    det_path, _, new = served
    with _client(det_path, max_upload_mb=0.01) as c:
        _wait_ready(c)
        payload = b"\xff" * 20_000
        r = c.post("/v1/score", files=[("files", ("big.jpg", payload, "image/jpeg"))])
        assert r.status_code == 413 and "too large" in r.json()["error"]

        def chunked():  # no Content-Length: counted as it streams (tests/test_serve_live.py: on a socket)
            for _ in range(100):
                yield b"x" * 4096

        r = c.post("/v1/score", content=chunked(), headers={"content-type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 413
        r = c.post("/v1/score", files=_files(new / "photo.jpg"))  # small uploads still work
        assert r.status_code == 200 and r.json()["results"][0]["error"] is None


def test_token_required_on_api_calls(served):
    det_path, _, new = served
    with _client(det_path, token=TOKEN) as c:
        assert _wait_ready(c)["auth"] is True  # /healthz stays open for probes
        assert c.get("/").status_code == 200  # the page asks for the token itself
        for path in ("/v1/detector", "/metrics"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        r = c.post("/v1/score", files=_files(new / "photo.jpg"))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/score", files=_files(new / "photo.jpg"), headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
    assert token_ok(f"bearer {TOKEN}", TOKEN) and not token_ok(TOKEN, TOKEN) and not token_ok(None, TOKEN)


def test_only_loopback_host_names_are_answered_unless_allowed(client, served):
    for ok in ("localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "[::1]", "LOCALHOST."):
        assert client.get("/healthz", headers={"Host": ok}).status_code == 200, ok
    for bad in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example:80"):
        r = client.get("/v1/detector", headers={"Host": bad})
        assert r.status_code == 400 and "--allow-host" in r.json()["error"] and "\n" not in r.text, bad
    with _client(served[0], allow_hosts=("box.lan",)) as c:
        assert c.get("/healthz", headers={"Host": "box.lan:8000"}).status_code in (200, 503)
        assert c.get("/healthz", headers={"Host": "other.lan"}).status_code == 400
    with _client(served[0], allow_hosts=("*",)) as c:
        assert c.get("/healthz", headers={"Host": "other.lan"}).status_code in (200, 503)
    assert bind_address("[::1]") == "::1" and bind_address("::1") == "::1" and url_host("::1") == "[::1]"


def test_binding_beyond_loopback_needs_token(run_cli, served):
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("0.0.0.0", TOKEN, False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(clipdet.errors.UsageError, match="--token"):
        check_bind("0.0.0.0", None, False)
    r = run_cli("serve", "--detector", served[0], "--host", "0.0.0.0", "--port", "1")
    assert r.exit_code == 2 and "--token" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", "--detector", str(served[2] / "missing.clipdet"))
    assert r.exit_code == 2 and "no such file" in r.stderr


def test_metrics_count_requests_images_errors_batches(client, served):
    _, _, new = served
    client.post("/v1/score", files=_files(new / "photo.jpg", new / "broken.png"))
    text = client.get("/metrics").text
    assert 'clipdet_requests_total{route="/v1/score",status="200"}' in text
    assert 'clipdet_images_total{label="error"}' in text and "clipdet_image_errors_total" in text
    assert "clipdet_request_seconds_bucket" in text and "clipdet_batch_size_bucket" in text
    assert "clipdet_model_ready 1.0" in text


def test_cache_is_reused_and_written_only_with_cache_write(served, make_image, tmp_path):
    det_path, ref_cache, new = served
    det = Detector.load(det_path)
    ref = sorted((new.parent / "tree" / "real" / "a").iterdir())[0]
    fresh = make_image(tmp_path / "fresh.png", size=(70, 70), seed=55)
    sha = sha256_bytes(fresh.read_bytes())
    with _client(det_path, cache=ref_cache) as c:
        _wait_ready(c)
        rows = c.post("/v1/score", files=_files(ref, fresh)).json()["results"]
        assert rows[0]["nearest_similarity"] == pytest.approx(1.0, abs=1e-3)  # a reference: itself
        assert "clipdet_cache_hits_total 1.0" in c.get("/metrics").text
    assert sha not in FeatureCache(ref_cache).cached_shas(det.backbone_key, det.view)  # read-only by default
    with _client(det_path, cache=ref_cache, cache_write=True) as c:
        _wait_ready(c)
        again = c.post("/v1/score", files=_files(fresh)).json()["results"][0]
    assert sha in FeatureCache(ref_cache).cached_shas(det.backbone_key, det.view)
    assert again["score"] == rows[1]["score"]


def test_a_damaged_cached_row_is_embedded_again(served, tmp_path):
    """As `clipdet score` does: a cached row that fails its checks is re-embedded, not an error."""
    h5py = pytest.importorskip("h5py")
    import numpy as np

    det_path, _, new = served
    cache = tmp_path / "c.h5"
    with _client(det_path) as c:  # no cache: the reference score
        _wait_ready(c)
        want = c.post("/v1/score", files=_files(new / "photo.jpg")).json()["results"][0]
    with _client(det_path, cache=str(cache), cache_write=True) as c:
        _wait_ready(c)
        c.post("/v1/score", files=_files(new / "photo.jpg"))
    fc = FeatureCache(str(cache))
    fc.compact(full=True)
    det = Detector.load(det_path)
    sha = sha256_bytes((new / "photo.jpg").read_bytes())
    with h5py.File(fc.segments()[0], "r+") as f:  # bit rot that keeps the checksum valid: a NaN in place
        grp = f[f"features/{det.backbone_key}/{det.view}"]
        i = [s.decode() if isinstance(s, bytes) else s for s in grp["sha256"][:]].index(sha)
        row = grp["embedding"][i]
        row[3] = np.nan
        grp["embedding"][i] = row
    with _client(det_path, cache=str(cache)) as c:
        _wait_ready(c)
        with pytest.warns(UserWarning, match="damaged"):
            rows = c.post("/v1/score", files=_files(new / "photo.jpg", new / "photo.jpg")).json()["results"]
        again = c.post("/v1/score", files=_files(new / "photo.jpg")).json()["results"][0]
    for got in (*rows, again):
        assert got["error"] is None and got["score"] == want["score"], got
    with _client(det_path, cache=str(cache), cache_write=True) as c:  # --cache-write: a whole row again
        _wait_ready(c)
        with pytest.warns(UserWarning, match="damaged"):
            c.post("/v1/score", files=_files(new / "photo.jpg"))
    fresh = FeatureCache(str(cache)).load(det.backbone_key, det.view, shas=[sha])
    assert list(fresh.sha256) == [sha] and np.isfinite(fresh.embedding).all()


def test_healthz_is_503_while_the_model_loads(served):
    det_path, _, new = served
    engine = Engine(Detector.load(det_path), device="cpu")
    gate = threading.Event()
    real_load = engine.load
    engine.load = lambda: (gate.wait(30), real_load())
    with TestClient(create_app(engine), base_url=LOCAL) as c:
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert c.post("/v1/score", files=_files(new / "photo.jpg")).status_code == 503
        gate.set()
        _wait_ready(c)
        assert c.post("/v1/score", files=_files(new / "photo.jpg")).status_code == 200


def test_micro_batcher_gathers_concurrent_items_in_order():
    sizes = []

    def fn(batch):
        sizes.append(len(batch))
        return [x * 10 for x in batch]

    async def main():
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(fn, pool, max_batch=4, max_wait_ms=50)
            b.start()
            out = await asyncio.gather(*(b.submit(i) for i in range(10)))
            await b.stop()
            return out

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert sum(sizes) == 10 and max(sizes) == 4 and len(sizes) <= 4


def test_stability_field_equals_clipdet_score_stability(client, served, run_cli, tmp_path):
    det_path, _, new = served
    order = [new / "photo.jpg", new / "render.png", new / "broken.png"]
    r = client.post("/v1/score", files=_files(*order), data={"stability": "jpeg:75,crop:224"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stability"]["views"] == ["jpeg:75", "crop:224"]
    rows = body["results"]
    assert list(rows[0]) == COLUMNS + ["provenance_details", "stable", "score_min", "score_max", "flips",
                                       "unsure_reason"]
    out = tmp_path / "st.csv"
    res = run_cli("score", *[str(p) for p in order], "--detector", det_path, "--cache", str(tmp_path / "c.h5"),
                  "--out", str(out), "--device", "cpu", "--stability", "--stability-views", "jpeg:75,crop:224")
    assert res.exit_code == 1, res.stderr
    offline = {row["path"].rsplit("/", 1)[-1]: row for row in csv.DictReader(io.StringIO(out.read_text()))}
    for row in rows[:2]:
        off = offline[row["path"]]
        assert row["label"] == off["label"] and row["flips"] == off["flips"]
        assert f"{row['score_min']:.6g}" == off["score_min"] and f"{row['score_max']:.6g}" == off["score_max"]
        assert row["stable"] == (off["stable"] == "true") and bool(row["unsure_reason"]) == bool(off["unsure_reason"])
    assert rows[2]["error"] and rows[2]["stable"] is None
    q = client.post("/v1/score?stability=1", files=_files(new / "photo.jpg")).json()
    assert q["stability"]["views"] == ["jpeg:75", "resize:0.5", "crop:224"] and q["results"][0]["score_min"] is not None
    assert "stable" not in client.post("/v1/score", files=_files(new / "photo.jpg")).json()["results"][0]
    bad = client.post("/v1/score", files=_files(new / "photo.jpg"), data={"stability": "jpg:5"})
    assert bad.status_code == 422 and "unknown view" in bad.json()["error"]


def test_provenance_in_json_and_page(client, tmp_path):
    pytest.importorskip("c2pa", reason="the 'c2pa' extra is not installed (pip install 'clipdet[c2pa]')")
    pytest.importorskip("cryptography", reason="the test certificate needs cryptography (dev extra)")
    from marked_files import c2pa_jpeg, jpeg_with_xmp

    files = [("files", ("x.jpg", jpeg_with_xmp(tmp_path / "x.jpg").read_bytes(), "image/jpeg")),
             ("files", ("c.jpg", c2pa_jpeg("TestGen"), "image/jpeg"))]
    rows = client.post("/v1/score", files=files).json()["results"]
    assert rows[0]["provenance"] == "xmp:trainedAlgorithmicMedia"
    assert rows[1]["provenance"].startswith("c2pa:valid TestGen")
    assert rows[1]["provenance_details"]["marks"][0]["claim_generator"] == "TestGen"
    page = client.get("/").text
    assert "Unsure" in page and "Missing marks prove nothing" in page and 'name="stability"' in page
    meta = client.get("/v1/detector").json()
    assert "unsure band" in meta["unsure"]
