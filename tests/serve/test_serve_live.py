"""clipdet serve as a real server on 127.0.0.1: a browser uploads through the page, a bounded load test,
a streamed over-limit body. Each test starts `python -m clipdet serve` itself and stops it by its handle."""

from __future__ import annotations

import asyncio
import hashlib
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="the 'serve' extra is not installed (pip install 'clipdet[serve]')")
pytest.importorskip("fastapi", reason="the 'serve' extra is not installed (pip install 'clipdet[serve]')")

import clipdet  # noqa: E402
from clipdet.extract.discover import discover  # noqa: E402
from clipdet.extract.lazy import LazyBackbone  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port(family=socket.AF_INET, host="127.0.0.1") -> int:
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """`python -m clipdet serve ...` on 127.0.0.1:<free port>, stopped by `stop()` (terminate, then kill)."""

    def __init__(self, args, env, log: Path, host: str = "127.0.0.1"):
        six = ":" in host
        self.port = _free_port(socket.AF_INET6, "::1") if six else _free_port()
        self.url = f"http://{'[::1]' if six else host}:{self.port}"
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "clipdet", "serve", *map(str, args), "--host",
                                      host, "--port", str(self.port), "--device", "cpu"],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log

    def wait_ready(self, timeout: float = 120.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become ready: " + self.log_path.read_text())

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory, make_image, tiny_spec, tiny_backbone):
    """A knn detector (tiny model) fitted on 4+4 references; returns (detector path, image folder)."""
    root = tmp_path_factory.mktemp("live")
    for cls, gen, base in (("real", "a", 0), ("fake", "genA", 100), ("fake", "genB", 200)):
        for i in range(5):
            make_image(root / "tree" / cls / gen / f"{gen}_{i}.png", size=(64 + 8 * i, 64), seed=base + i,
                       fake=cls == "fake")
    cache = str(root / "refs.h5")
    clipdet.extract(discover([str(root / "tree")]), tiny_spec, cache=cache,
                    lazy=LazyBackbone(tiny_spec, loaded=tiny_backbone))
    det = clipdet.fit(head="knn", shots=4, seed=0, cache=cache)
    imgs = root / "uploads"
    for i in range(10):
        make_image(imgs / f"u{i}.{'jpg' if i % 2 else 'png'}", size=(80 + 4 * i, 60), seed=500 + i, fake=i % 3 == 0)
    return str(det.save(root / "det.clipdet")), imgs


@pytest.fixture
def server(detector_file, subprocess_env, tmp_path):
    started = []

    def start(*extra, host="127.0.0.1"):
        s = Server(["--detector", detector_file[0], *extra], subprocess_env, tmp_path / f"server{len(started)}.log",
                   host=host)
        started.append(s)
        s.wait_ready()
        return s

    yield start
    for s in started:
        log = s.stop()
        assert "Traceback" not in log, log


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _has_ipv6_loopback() -> bool:
    try:
        _free_port(socket.AF_INET6, "::1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_loopback_binds_and_foreign_host_names_get_400(server):
    s = server(host="[::1]")  # bracketed, as in a URL: binds ::1 without a token
    assert httpx.get(s.url + "/healthz", timeout=5).status_code == 200
    r = httpx.get(s.url + "/healthz", headers={"Host": "rebound.example"}, timeout=5)
    assert r.status_code == 400 and "rebound.example" in r.json()["error"]
    assert server(host="::1").url.startswith("http://[::1]:")


def test_browser_uploads_through_the_page(server, detector_file, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (serve extra)")
    exe = _chromium()
    if exe is None:
        pytest.skip("Debian chromium is not installed and could not be (make test installs it with apt as root)")
    s = server("--token", "page-token")
    img = detector_file[1] / "u3.jpg"
    # the page asks for the stability check (its box is ticked by default)
    api = httpx.post(s.url + "/v1/score", files=[("files", (img.name, img.read_bytes(), "image/jpeg"))],
                     data={"stability": "1"}, headers={"Authorization": "Bearer page-token"},
                     timeout=30).json()["results"][0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(s.url + "/")
            page.wait_for_selector("#auth", state="visible", timeout=20_000)  # the server has a token: ask
            page.fill("#token", "page-token")
            page.click("#auth button")
            page.wait_for_selector("#status.ok", timeout=20_000)
            page.set_input_files("#file-input", [str(img), str(detector_file[1] / "u0.png")])
            done = "article.card:not([data-label=pending])"
            sync_api.expect(page.locator(done)).to_have_count(2, timeout=30_000)
            card = page.locator(f"article.card[data-sha256='{api['sha256']}']")
            assert card.get_attribute("data-label") == api["label"]
            verdict = card.locator(".verdict").inner_text()
            assert verdict == {"fake": "Likely AI-generated", "real": "Likely a real photo",
                               "unsure": "Unsure"}[api["label"]]
            assert "Missing marks prove nothing" in card.locator(".prov").inner_text()
            assert img.name in card.inner_text() and f"{round(100 * api['p_fake'])}%" in card.inner_text()
            assert api["nearest_path"].rsplit("/", 1)[-1] in card.inner_text()
            # a file that is not an image gets a card with the error
            bad = tmp_path / "notes.txt"
            bad.write_text("not an image")
            page.set_input_files("#file-input", str(bad))
            page.wait_for_selector("article.card[data-label=unknown]", timeout=30_000)
            assert "not an image" in page.locator("article.card[data-label=unknown] .error").inner_text()
            shot = tmp_path / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def test_browser_unsure_card_says_why(server, detector_file, tmp_path):
    """A threshold between an image's clean score and a perturbed copy's makes its verdict flip: the page
    shows an Unsure card with the reason."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (serve extra)")
    exe = _chromium()
    if exe is None:
        pytest.skip("Debian chromium is not installed and could not be (make test installs it with apt as root)")
    img = detector_file[1] / "u4.png"
    s = server()
    row = httpx.post(s.url + "/v1/score", files=[("files", (img.name, img.read_bytes(), "image/png"))],
                     data={"stability": "1"}, timeout=30).json()["results"][0]
    other = row["score_max"] if row["score_max"] != row["score"] else row["score_min"]
    if other == row["score"]:
        pytest.skip("every perturbed copy scored exactly the same")
    s.stop()
    s = server("--threshold", repr((row["score"] + other) / 2))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(s.url + "/")
            page.wait_for_selector("#status.ok", timeout=20_000)
            page.set_input_files("#file-input", [str(img)])
            page.wait_for_selector("article.card[data-label=unsure]", timeout=30_000)
            card = page.locator("article.card[data-label=unsure]")
            assert card.locator(".verdict").inner_text() == "Unsure"
            assert "Why unsure: the verdict changes from" in card.locator(".why").inner_text()
            assert "1 unsure" in page.locator("#counts").inner_text()
        finally:
            browser.close()


def test_load_50_clients_x_20_requests_nothing_lost(server, detector_file):
    s = server("--max-batch", "16", "--max-wait-ms", "5")
    paths = sorted(detector_file[1].iterdir())
    blobs = [(p.name, p.read_bytes()) for p in paths]
    expected_sha = {name: hashlib.sha256(data).hexdigest() for name, data in blobs}
    clients, per_client = 50, 20

    async def client(i, http):
        rows = []
        for j in range(per_client):
            name, data = blobs[(i + j) % len(blobs)]
            r = await http.post("/v1/score", files=[("files", (name, data, "application/octet-stream"))])
            rows.append((r.status_code, r.json()))
        return rows

    async def main():
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=s.url, timeout=120, limits=limits) as http:
            return await asyncio.wait_for(asyncio.gather(*(client(i, http) for i in range(clients))), 300)

    results = [x for rows in asyncio.run(main()) for x in rows]
    assert len(results) == clients * per_client
    assert [code for code, _ in results if code != 200] == []
    scores: dict[str, set] = {}
    for _, body in results:
        (row,) = body["results"]
        assert row["error"] is None and row["sha256"] == expected_sha[row["path"]]
        scores.setdefault(row["path"], set()).add((row["score"], row["label"]))
    assert all(len(v) == 1 for v in scores.values())  # same bytes, same answer, whatever the batch
    text = httpx.get(s.url + "/metrics").text
    assert f'clipdet_requests_total{{route="/v1/score",status="200"}} {clients * per_client}.0' in text
    count = float(text.split("clipdet_batch_size_count ")[1].split()[0])
    total = float(text.split("clipdet_batch_size_sum ")[1].split()[0])
    assert total == clients * per_client and count < total  # concurrent requests shared model batches


def test_streamed_body_over_limit_is_refused_before_it_ends(server):
    s = server("--max-upload-mb", "0.05")
    with socket.create_connection(("127.0.0.1", s.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=zz\r\n\r\n")
        part = (b'--zz\r\nContent-Disposition: form-data; name="files"; filename="huge.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n")
        sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        chunk, total, sent = b"x" * 16384, 100, 0
        for _ in range(total):  # a 1.6 MB body, 16 kB at a time; stop once the server has answered
            if select.select([sock], [], [], 0.05)[0]:
                break
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        head = sock.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head
    assert sent < total * len(chunk) // 2, sent  # refused long before the body ended
