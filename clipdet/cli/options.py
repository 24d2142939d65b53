"""Typer options that several commands share (one declaration, one help text)."""

from __future__ import annotations

import typer

BackboneOpt = typer.Option(None, "--backbone", "-b", help="ARCH:PRETRAINED, ARCH:/path/to/weights, ARCH:random "
                           "or onnx:PATH [default: ViT-L-14:openai, or the only backbone in the cache]")
CacheOpt = typer.Option(None, "--cache", "-c", help="Feature cache file [default: $CLIPDET_CACHE or cache/clipdet.h5]")
ManifestOpt = typer.Option(None, "--manifest", "-m", help="CSV with columns path,label,generator")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar or per-file lines; summary only")
CaptionsOpt = typer.Option(None, "--captions", help="CSV with columns sha256 or path, and caption: captions for "
                           "detectors with --features image+text or residual (a manifest's caption column works too)")
PrecisionOpt = typer.Option("auto", "--precision", help="auto (bf16 on CUDA and on CPUs with native bf16, else "
                            "fp32), fp32, bf16, or fp16 (CUDA)")


EngineOpt = typer.Option("local", "--engine", help="local (threads in this process) or ray (Ray Data stages on a "
                         "Ray cluster; images must be readable from every node)")
RayAddressOpt = typer.Option(None, "--ray-address", help="Ray head HOST:PORT for --engine ray [default: "
                             "$RAY_ADDRESS, else a local Ray started for the run]")
