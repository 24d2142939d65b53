"""`clipdet export onnx`: an open_clip image tower (or an ONNX model) to ONNX fp32/int8 (thin over
clipdet.backbones.export)."""

from __future__ import annotations

from typing import Optional

import typer

export_app = typer.Typer(help="Export a backbone's image tower for ONNX Runtime (scoring without PyTorch).",
                         no_args_is_help=True, rich_markup_mode=None)


def register(app: typer.Typer) -> None:
    """Add the `export` command group to `app`."""
    from .common import err, quiet_warnings, run_command

    @export_app.command("onnx")
    def export_onnx_cmd(
        backbone: str = typer.Option(..., "--backbone", "-b", help="ARCH:WEIGHTS of an open_clip model (or "
                                     "onnx:PATH with --int8, to quantize an ONNX model)"),
        out: str = typer.Option(..., "--out", "-o", help="Output FILE.onnx; FILE.onnx.json is written beside it"),
        int8: bool = typer.Option(False, "--int8", help="Dynamic int8 quantization (ONNX Runtime; per-channel "
                                  "weights); prints the cosine to the fp32 model"),
        check_images: Optional[str] = typer.Option(None, "--check-images", help="Folder of images to check the "
                                                   "export on [default: 8 generated test images]"),
        n_check: int = typer.Option(8, "--n-check", min=1, help="How many images to check the export on"),
    ) -> None:
        """Export to ONNX with dynamic batch size and every block's tokens as outputs (so --layers works),
        write FILE.onnx.json, and check the export against its source (fp32: cosine >= 0.9999, else it fails).
        Use the result as --backbone onnx:FILE.onnx anywhere, also where PyTorch is not installed."""

        def go():
            quiet_warnings(False)
            from ..backbones.export import INT8_POOR_COSINE, export_onnx, load_images
            from ..backbones.export import check_images as gen_images

            images = load_images(check_images, n_check) if check_images else gen_images(n_check)
            rep = export_onnx(backbone, out, int8=int8, images=images)
            kind = "int8" if int8 else "fp32"
            typer.echo(f"wrote {rep.path} ({kind}) and {rep.path}.json; cosine to {rep.source}"
                       f"{' (fp32)' if int8 else ''} on {rep.n_images} images: min {rep.cosine_min:.6f}, "
                       f"mean {rep.cosine_mean:.6f}")
            if int8 and rep.poor:
                err(f"warning: int8 cosine {rep.cosine_min:.4f} < {INT8_POOR_COSINE}: the quantized model is poor "
                    "here; measure detection quality before using it (or use the fp32 export)")
            typer.echo(f"use it as: --backbone onnx:{rep.path}")

        run_command(go)

    app.add_typer(export_app, name="export")
