"""Provenance read from bytes: PNG text chunks, XMP in JPEG APP1, EXIF Software, C2PA; never raises."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from marked_files import c2pa_jpeg, jpeg_bytes, jpeg_with_software, jpeg_with_xmp, png_with_text, xmp_packet
from PIL import Image, PngImagePlugin

from clipdet.provenance import read_provenance, read_provenance_file

WEBUI = ("a cat in a hat\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, "
         "Size: 1024x1024, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: v1.6.0")


def test_png_webui_parameters(tmp_path):
    p = read_provenance_file(png_with_text(tmp_path / "a.png", {"parameters": WEBUI}))
    assert p.short == "png:parameters (sd_xl_base_1.0)" and p.ai and not p.problems
    d = p.to_dict()["marks"][0]
    assert d["front_end"] == "Stable Diffusion WebUI" and d["model"] == "sd_xl_base_1.0"


def test_png_comfyui_invokeai_novelai(tmp_path):
    prompt = '{"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev.safetensors"}}}'
    p = read_provenance_file(png_with_text(tmp_path / "c.png", {"prompt": prompt, "workflow": "{}"},
                                           compressed=("workflow",)))
    assert p.short == "png:prompt (ComfyUI, flux1-dev.safetensors)"
    p = read_provenance_file(png_with_text(tmp_path / "i.png",
                                           {"invokeai_metadata": '{"model": {"name": "sdxl-turbo"}}'}))
    assert p.short == "png:invokeai_metadata (InvokeAI, sdxl-turbo)"
    p = read_provenance_file(png_with_text(tmp_path / "n.png", {"Software": "NovelAI", "Comment": "{}",
                                                                "Source": "NovelAI Diffusion V3"}))
    assert p.short == "png:Software (NovelAI)" and p.ai


def test_png_ordinary_text_is_no_mark(tmp_path):
    p = read_provenance_file(png_with_text(tmp_path / "o.png", {"Software": "GIMP 2.10", "Title": "holiday"}))
    assert p.short == "" and not p.ai and not p.marks


def test_xmp_digital_source_type_in_jpeg_app1(tmp_path):
    p = read_provenance_file(jpeg_with_xmp(tmp_path / "x.jpg"))
    assert p.short == "xmp:trainedAlgorithmicMedia" and p.ai
    comp = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
    p = read_provenance_file(jpeg_with_xmp(tmp_path / "y.jpg", source_type=comp, attribute=False))
    assert p.short == "xmp:compositeWithTrainedAlgorithmicMedia" and p.ai
    cam = "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"
    p = read_provenance_file(jpeg_with_xmp(tmp_path / "z.jpg", source_type=cam))
    assert p.short == "xmp:digitalCapture" and not p.ai  # reported, but says nothing of a generator


def test_xmp_in_png_itxt(tmp_path):
    p = read_provenance_file(png_with_text(tmp_path / "x.png", {"XML:com.adobe.xmp": xmp_packet().decode()}))
    assert p.short == "xmp:trainedAlgorithmicMedia"


def test_exif_software_of_known_generator(tmp_path):
    assert read_provenance_file(jpeg_with_software(tmp_path / "f.jpg", "Adobe Firefly")).short == \
        "exif:Software (Adobe Firefly)"
    assert read_provenance_file(jpeg_with_software(tmp_path / "g.jpg", "Adobe Photoshop 25.0")).short == ""


def test_c2pa_signed_valid_then_tampered():
    pytest.importorskip("c2pa")
    pytest.importorskip("cryptography")
    data = c2pa_jpeg("TestGen")
    p = read_provenance(data)
    # signed by a throwaway certificate: the signature checks, the signer is on no trust list
    assert p.short == "c2pa:valid TestGen; c2pa:trainedAlgorithmicMedia" and p.ai
    det = p.to_dict()["marks"][0]
    assert det["claim_generator"] == "TestGen" and det["signer"] == "clipdet test signer" and det["failures"] == []
    t = bytearray(data)
    t[-20] ^= 0xFF  # one byte of the image data changed after signing
    p = read_provenance(bytes(t))
    assert p.marks[0].value == "invalid TestGen" and "assertion.dataHash.mismatch" in p.marks[0].details["failures"]


def test_malformed_files_never_raise(tmp_path):
    good = jpeg_bytes()
    seg = b"\xff\xe1" + struct.pack(">H", 60000) + b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta"
    cases = [b"", b"\x00" * 10, good[:3], good[:2] + seg + good[2:40], b"\x89PNG\r\n\x1a\n\x00\x00",
             b"\x89PNG\r\n\x1a\n" + struct.pack(">I4s", 10**9, b"tEXt"),
             b"\x89PNG\r\n\x1a\n" + struct.pack(">I4s", 8, b"zTXt") + b"k\x00\x00notzlib" + b"\0" * 4,
             good[:2] + b"\xff\xeb\x00\x10jumbc2pa....." + good[2:],  # a JUMBF that is not a manifest
             b"RIFF\x00\x00\x00\x00WEBP<x:xmpmeta Iptc4xmpExt:DigitalSourceType='x'"]
    for i, data in enumerate(cases):
        p = read_provenance(data)
        assert isinstance(p.short, str)
        (tmp_path / f"bad{i}").write_bytes(data)
        assert isinstance(read_provenance_file(tmp_path / f"bad{i}").short, str)  # the metadata-only reader too
    assert read_provenance(cases[3]).problems and "past the end" in read_provenance(cases[3]).problems[0]
    assert "zTXt" in read_provenance(cases[6]).problems[0]
    bad_c2pa = read_provenance(cases[7])
    assert bad_c2pa.marks[0].short() in ("c2pa:unreadable", "c2pa:unverified") and bad_c2pa.problems
    missing = read_provenance_file(tmp_path / "nope.jpg")
    assert missing.short == "" and "cannot read" in missing.problems[0]


def test_zip_bomb_text_is_cut(tmp_path):
    blob = zlib.compress(b"a" * (8 << 20))
    body = b"parameters\x00\x00" + blob
    chunk = struct.pack(">I4s", len(body), b"zTXt") + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    png = buf.getvalue()
    p = read_provenance(png[:33] + chunk + png[33:])
    assert p.short.startswith("png:parameters") and len(p.to_dict()["marks"][0]["parameters"]) <= 2000


def test_file_reader_reads_metadata_only_and_agrees_with_bytes(tmp_path, monkeypatch):
    import clipdet.provenance.files as files_mod

    big = tmp_path / "big.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", WEBUI)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (600, 600, 3), dtype=np.uint8)).save(big, pnginfo=info)
    jpg = jpeg_with_xmp(tmp_path / "x.jpg")
    c2 = tmp_path / "c.jpg"
    c2.write_bytes(c2pa_jpeg("TestGen")) if _has_c2pa() else c2.write_bytes(jpeg_bytes())
    for path in (big, jpg, c2):
        assert read_provenance_file(path).short == read_provenance(path.read_bytes()).short
    seen = []
    real = files_mod.metadata_bytes

    def spy(f, limit):
        data, whole = real(f, limit)
        seen.append((len(data), whole))
        return data, whole

    monkeypatch.setattr(files_mod, "metadata_bytes", spy)
    read_provenance_file(big)
    assert seen[-1][1] is False and seen[-1][0] < 5000 < big.stat().st_size // 100  # not the pixels


def _has_c2pa() -> bool:
    try:
        import c2pa  # noqa: F401
        import cryptography  # noqa: F401
    except ImportError:
        return False
    return True
