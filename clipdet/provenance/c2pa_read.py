"""C2PA manifests through the official `c2pa-python` bindings (optional extra `clipdet[c2pa]`).

Only called when the container holds a JUMBF/C2PA store, so files without one cost nothing here.
"""

from __future__ import annotations

import io
import json

from .marks import AI_SOURCE_TYPES, Mark

MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "tiff": "image/tiff", "heif": "image/heif"}
#: The reader's validation_state → our word: signature checks and the signer is on a trust list; the
#: signature checks but the signer is not on a trust list; something does not check.
STATES = {"Trusted": "trusted", "Valid": "valid", "Invalid": "invalid"}


def c2pa_marks(data: bytes, fmt: str, problems: list[str]) -> list[Mark]:
    """Marks of the active C2PA manifest in `data`: `c2pa:<valid|trusted|invalid> <claim generator>`, and
    `c2pa:<DigitalSourceType>` for AI source types in its actions. Problems go to `problems`."""
    try:
        import c2pa
    except ImportError:
        problems.append("c2pa: a manifest is present but not read (pip install 'clipdet[c2pa]')")
        return [Mark("c2pa", "unverified", details={"reason": "c2pa-python not installed"})]
    try:
        with c2pa.Reader(MIME.get(fmt, "image/jpeg"), io.BytesIO(data)) as reader:
            store = json.loads(reader.json())
    except Exception as e:  # noqa: BLE001 - the library raises its own errors on damaged manifests
        problems.append(f"c2pa: manifest unreadable ({str(e)[:200]})")
        return [Mark("c2pa", "unreadable", details={"error": str(e)[:500]})]
    active = (store.get("manifests") or {}).get(store.get("active_manifest") or "", {})
    info = active.get("claim_generator_info") or []
    gen = (info[0].get("name") if info and isinstance(info[0], dict) else None) or active.get("claim_generator") or "?"
    state = STATES.get(str(store.get("validation_state")), "invalid" if store.get("validation_status") else "valid")
    failures = [s.get("code") for s in store.get("validation_status") or []
                if s.get("code") != "signingCredential.untrusted"]
    sources = []
    for a in active.get("assertions") or []:
        if str(a.get("label", "")).startswith("c2pa.actions"):
            for act in (a.get("data") or {}).get("actions") or []:
                code = str(act.get("digitalSourceType") or "").rstrip("/").rsplit("/", 1)[-1]
                if code and code not in sources:
                    sources.append(code)
    sig = active.get("signature_info") or {}
    details = {"claim_generator": gen, "state": state, "failures": failures, "digital_source_types": sources,
               "signer": sig.get("common_name") or sig.get("issuer"), "issuer": sig.get("issuer"),
               "manifests": len(store.get("manifests") or {})}
    ai = any(s in AI_SOURCE_TYPES for s in sources)
    out = [Mark("c2pa", f"{state} {gen}", ai=True if ai else None, details=details)]
    out += [Mark("c2pa", s, ai=True if s in AI_SOURCE_TYPES else None) for s in sources]
    return out
