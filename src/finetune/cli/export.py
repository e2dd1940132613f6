"""``finetune export BUNDLE --format fused|gguf|peft OUT``: a bundle as a servable model, verified equal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from finetune.cli.main import settings_from, user_errors
from finetune.cli.options import ConfigOption, SetOption, human_size
from finetune.export import FORMATS


@user_errors
def export(
    bundle: Annotated[str, typer.Argument(help="Bundle directory, <store>/runs/<run_id> or <store>/champion.")],
    out: Annotated[Path, typer.Argument(help="Output directory (must not exist or be empty).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help=f"One of: {', '.join(FORMATS)}.")] = "fused",
    gguf_type: Annotated[
        list[str] | None, typer.Option("--gguf-type", help="GGUF tensor type: f16 (default) or q8_0; repeatable.")
    ] = None,
    requantize: Annotated[
        bool, typer.Option(help="fused: quantize the merged layers back like the quantized base (error reported).")
    ] = False,
    tolerance: Annotated[
        float | None, typer.Option(help="Max |Δlogit| allowed by the verification (default per format and dtype).")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Base model to load (default: the one the bundle was trained on).")
    ] = None,
    base_model_id: Annotated[
        str | None, typer.Option(help="peft: base_model_name_or_path to record (default: the bundle's model.path).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty OUT.")] = False,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Export a bundle as a fused mlx-lm model, GGUF (llama.cpp, Ollama) or a PEFT adapter, verified against it."""
    from finetune.pipeline.stages import export_stage

    settings = settings_from(config, overrides)
    result = export_stage(
        settings,
        bundle,
        fmt,
        out,
        gguf_types=tuple(gguf_type or ("f16",)),
        requantize=requantize,
        tolerance=tolerance,
        base_model=base_model,
        base_model_id=base_model_id,
        overwrite=force,
    )
    typer.echo(f"exported {fmt} to {result.out_dir} in {result.seconds:.1f} s")
    for name, entry in result.files.items():
        typer.echo(f"  {name}  {human_size(entry.size)}  sha256 {entry.sha256[:16]}")
    for check, figures in result.verification.items():
        error = figures.get("max_abs_logit_error", figures.get("max_abs_error"))
        typer.echo(f"  verified {check}: max |Δ| {error:.3g} (tolerance {figures['tolerance']:g})")
        if "requantize_max_abs_logit_error" in figures:
            typer.echo(f"  re-quantization adds: max |Δlogit| {figures['requantize_max_abs_logit_error']:.3g}")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
