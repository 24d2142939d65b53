"""Builders of files carrying provenance marks, for tests (tests/ is on sys.path: `from marked_files import ...`):
PNG text chunks, XMP in a JPEG APP1 segment, EXIF Software, and a C2PA manifest signed with a throwaway
certificate made here with `cryptography`."""

from __future__ import annotations

import datetime
import io
import json
import struct

from PIL import Image, PngImagePlugin

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def png_with_text(path, texts: dict, size=(48, 40), color=(10, 120, 200), compressed: tuple = ()):
    """A PNG with tEXt chunks (zTXt for the keys in `compressed`)."""
    info = PngImagePlugin.PngInfo()
    for k, v in texts.items():
        info.add_text(k, v, zip=k in compressed)
    Image.new("RGB", size, color).save(path, "PNG", pnginfo=info)
    return path


def xmp_packet(source_type: str = TRAINED, attribute: bool = True) -> bytes:
    """An XMP packet declaring Iptc4xmpExt:DigitalSourceType (as an attribute or as an element)."""
    ns = 'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
    desc = (f'<rdf:Description rdf:about="" {ns} Iptc4xmpExt:DigitalSourceType="{source_type}"/>' if attribute else
            f'<rdf:Description rdf:about="" {ns}><Iptc4xmpExt:DigitalSourceType>{source_type}'
            '</Iptc4xmpExt:DigitalSourceType></rdf:Description>')
    return ('<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">' + desc +
            '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode()


def jpeg_bytes(size=(48, 40), color=(200, 60, 20), **save) -> bytes:
    """A plain JPEG."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def jpeg_with_xmp(path, packet: bytes | None = None, **kw):
    """A JPEG with an XMP packet in an APP1 segment right after SOI."""
    body = b"http://ns.adobe.com/xap/1.0/\x00" + (packet or xmp_packet(**kw))
    data = jpeg_bytes()
    seg = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    with open(path, "wb") as f:
        f.write(data[:2] + seg + data[2:])
    return path


def jpeg_with_software(path, software: str):
    """A JPEG whose EXIF IFD0 has Software = `software`."""
    exif = Image.Exif()
    exif[0x0131] = software
    with open(path, "wb") as f:
        f.write(jpeg_bytes(exif=exif.tobytes()))
    return path


def throwaway_signer():
    """A c2pa Signer from a throwaway CA + end-entity ES256 certificate (valid for a day)."""
    import c2pa
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clipdet tests")])

    def usage(sign: bool):
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=not sign,
                             crl_sign=not sign, encipher_only=False, decipher_only=False)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def build(subject, pub, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(name("clipdet test CA")).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(usage(not ca), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))
        if not ca:
            b = (b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                critical=False))
        return b.sign(ca_key, hashes.SHA256())

    ca = build(name("clipdet test CA"), ca_key.public_key(), True)
    cert = build(name("clipdet test signer"), key.public_key(), False)
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", chain, pem, None))


def c2pa_jpeg(generator: str = "TestGen", source_type: str = TRAINED) -> bytes:
    """JPEG bytes with a C2PA manifest (claim generator `generator`, a c2pa.created action with
    `source_type`) signed by a throwaway certificate."""
    import c2pa

    manifest = {"claim_generator_info": [{"name": generator, "version": "1.0"}], "title": "t.jpg",
                "format": "image/jpeg",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": source_type}]}}]}
    out = io.BytesIO()
    with c2pa.Builder(json.dumps(manifest)) as b:
        b.sign(throwaway_signer(), "image/jpeg", io.BytesIO(jpeg_bytes()), out)
    return out.getvalue()
