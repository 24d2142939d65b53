"""What the metadata blocks say about an image's origin: generator front ends' PNG text, XMP/IPTC
DigitalSourceType, EXIF Software of known generators. Pure string work on `containers.Blocks`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .containers import Blocks, exif_software

#: IPTC DigitalSourceType codes that say "made by a generative model" (all or in part).
AI_SOURCE_TYPES = {"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia", "algorithmicMedia",
                   "compositeSynthetic"}

#: Lower-case fragments of EXIF/PNG `Software` values written by image generators.
KNOWN_GENERATORS = ("stable diffusion", "novelai", "invokeai", "comfyui", "automatic1111", "midjourney", "dall-e",
                    "dall·e", "firefly", "imagen", "dreamstudio", "leonardo.ai", "nightcafe", "ideogram",
                    "flux.1", "gpt-4o", "sdxl", "fooocus")


@dataclass
class Mark:
    """One provenance mark: `source` (c2pa, xmp, png, exif), a short `value`, whether it says the image
    is generated (`ai`: True, or None when it says nothing either way) and `details` (for JSONL)."""

    source: str
    value: str
    ai: bool | None = None
    details: dict = field(default_factory=dict)

    def short(self) -> str:
        """'source:value', safe to join with '; '."""
        return f"{self.source}:{self.value}".replace(";", ",").replace("\n", " ")


def known_generator(software: str) -> bool:
    """Whether a Software string names a known image generator."""
    s = software.lower()
    return any(k in s for k in KNOWN_GENERATORS)


_DST = re.compile(r"DigitalSourceType(?:\s*=\s*[\"']([^\"']*)[\"']|>\s*([^<\s]+)\s*<|[^>]*?rdf:resource=[\"']"
                  r"([^\"']*)[\"'])")


def xmp_marks(packets: list[str]) -> list[Mark]:
    """IPTC DigitalSourceType values in XMP packets (`xmp:trainedAlgorithmicMedia`), and a CreatorTool
    naming a known generator."""
    out, seen = [], set()
    for pkt in packets:
        for m in _DST.finditer(pkt):
            uri = next(g for g in m.groups() if g is not None).strip()
            code = uri.rstrip("/").rsplit("/", 1)[-1]
            if code and code not in seen:
                seen.add(code)
                out.append(Mark("xmp", code, ai=True if code in AI_SOURCE_TYPES else None,
                                details={"DigitalSourceType": uri}))
        tool = re.search(r"CreatorTool(?:\s*=\s*[\"']([^\"']*)[\"']|>([^<]*)<)", pkt)
        if tool:
            name = (tool.group(1) or tool.group(2) or "").strip()
            if name and known_generator(name):
                out.append(Mark("xmp", f"CreatorTool ({name[:80]})", ai=True, details={"CreatorTool": name}))
    return out


def _webui_model(text: str) -> str:
    m = re.search(r"(?:^|[,\n]\s*)Model:\s*([^,\n]+)", text)
    return m.group(1).strip() if m else ""


def _comfy_models(text: str) -> list[str]:
    try:
        graph = json.loads(text)
    except ValueError:
        return []
    nodes = graph.values() if isinstance(graph, dict) else []
    names = []
    for node in nodes:
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict):
            for k in ("ckpt_name", "unet_name", "model_name"):
                if isinstance(inputs.get(k), str):
                    names.append(inputs[k])
    return names


def png_marks(texts: dict[str, str]) -> list[Mark]:
    """Marks of generator front ends in PNG text chunks: Stable Diffusion WebUI `parameters`, ComfyUI
    `prompt`/`workflow`, NovelAI (`Software`, `Comment`), InvokeAI (`invokeai_metadata`, `sd-metadata`,
    `Dream`), and any `Software` naming a known generator."""
    out = []
    if "parameters" in texts:
        model = _webui_model(texts["parameters"])
        out.append(Mark("png", "parameters" + (f" ({model})" if model else ""), ai=True,
                        details={"front_end": "Stable Diffusion WebUI", "model": model,
                                 "parameters": texts["parameters"][:2000]}))
    comfy = [k for k in ("prompt", "workflow") if k in texts]
    if comfy:
        models = _comfy_models(texts.get("prompt", ""))
        out.append(Mark("png", comfy[0] + f" (ComfyUI{', ' + models[0] if models else ''})", ai=True,
                        details={"front_end": "ComfyUI", "keys": comfy, "models": models}))
    for key in ("invokeai_metadata", "invokeai_graph", "sd-metadata", "Dream"):
        if key in texts:
            model = ""
            try:
                meta = json.loads(texts[key])
                m = meta.get("model") if isinstance(meta, dict) else None
                model = (m.get("name") or m.get("model_name") or "") if isinstance(m, dict) else str(m or "")
            except ValueError:
                pass
            out.append(Mark("png", key + f" (InvokeAI{', ' + model if model else ''})", ai=True,
                            details={"front_end": "InvokeAI", "key": key, "model": model}))
            break
    soft = texts.get("Software", "")
    if soft and (known_generator(soft) or "Comment" in texts and soft.lower().startswith("novelai")):
        out.append(Mark("png", f"Software ({soft[:80]})", ai=True,
                        details={"Software": soft, "Source": texts.get("Source", "")}))
    return out


def exif_marks(blocks: Blocks) -> list[Mark]:
    """EXIF `Software` values naming a known generator; damaged EXIF is reported in `blocks.problems`."""
    out = []
    for tiff in blocks.exif:
        try:
            soft = exif_software(tiff)
        except (ValueError, IndexError) as e:
            blocks.problems.append(f"exif: unreadable ({e})")
            continue
        if soft and known_generator(soft):
            out.append(Mark("exif", f"Software ({soft[:80]})", ai=True, details={"Software": soft}))
    return out
