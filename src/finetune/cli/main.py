"""The ``finetune`` command line."""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from finetune.cli.demo import DEFAULT_DEMO_MODEL, demo_overrides, print_examples
from finetune.cli.options import ConfigOption, FreshOption, RunIdOption, SetOption
from finetune.cli.runlog import new_run_id, run_log
from finetune.config import SECRET_FIELDS, Settings, load_settings

app = typer.Typer(
    help="Scheduled, orchestrated LoRA fine-tuning of open LLMs with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

HostsOption = Annotated[
    Path | None,
    typer.Option(help="mlx.launch hostfile: train data-parallel, one rank per entry (sets training.hosts)."),
]


def user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can fix into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from finetune.errors import USER_ERRORS

        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def settings_from(config: Path | None, overrides: list[str] | None, hosts: Path | None = None) -> Settings:
    extra = [f"training.hosts={hosts.resolve()}"] if hosts is not None else []
    return load_settings(config, [*(overrides or []), *extra])


DEMO_BANNER = (
    "finetune demo: {model} + bundled capitals dataset -> LoRA with MLX -> "
    "evaluation -> local object store, through a Prefect flow"
)


@app.command()
@user_errors
def demo(
    work_dir: Annotated[Path, typer.Option(help="Run directories, caches and the built tiny model.")] = Path(
        ".finetune"
    ),
    store: Annotated[
        str, typer.Option(help="Where to publish: a directory, file://… or s3://bucket/prefix.")
    ] = "finetune-store",
    overrides: SetOption = None,
    force: Annotated[bool, typer.Option(help="Train again even if nothing changed since the last demo run.")] = False,
    model: Annotated[
        str, typer.Option(help="Base model: the real SmolLM2 chat model, or builtin:tiny-llama (seconds, no answers).")
    ] = DEFAULT_DEMO_MODEL,
) -> None:
    """Fine-tune a real chat model on the bundled capitals data, through the whole pipeline: a few minutes on CPU."""
    console.print(DEMO_BANNER.format(model=model), highlight=False)
    settings = settings_from(None, [*demo_overrides(model, work_dir, store), *(overrides or [])])
    result = run_pipeline(settings, force=force)
    print_summary(result)
    print_examples(result, Console())


@app.command()
@user_errors
def run(
    config: ConfigOption = None,
    overrides: SetOption = None,
    run_id: RunIdOption = None,
    fresh: FreshOption = False,
    force: Annotated[
        bool, typer.Option(help="Train even if data, model and config equal the last published run's.")
    ] = False,
    hosts: HostsOption = None,
) -> None:
    """Run the pipeline (fetch, template, train, evaluate, publish) on your configuration."""
    settings = settings_from(config, overrides, hosts)
    print_summary(run_pipeline(settings, run_id=run_id, fresh=fresh, force=force))


@app.command()
@user_errors
def train(
    config: ConfigOption = None,
    overrides: SetOption = None,
    run_id: RunIdOption = None,
    fresh: FreshOption = False,
    hosts: HostsOption = None,
) -> None:
    """Run the training stage alone (fetch, template, train) without Prefect; prints the adapter path."""
    from finetune.pipeline.stages import train_stage

    settings = settings_from(config, overrides, hosts)
    result = train_stage(settings, run_id, fresh=fresh, log=lambda line: console.print(line, highlight=False))
    typer.echo(f"adapter: {result.adapter_dir}")
    typer.echo(f"validation loss: {result.initial_val_loss} -> {result.best_val_loss} (best, step {result.best_step})")


@app.command()
@user_errors
def evaluate(
    adapter: Annotated[str, typer.Option(help="Bundle directory, <store>/runs/<run_id> or <store>/champion.")],
    against: Annotated[str, typer.Option(help="Compare with: base, or champion (also includes base).")] = "base",
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Evaluate an adapter on the configured dataset and print the comparison table."""
    from finetune.evaluation.report import format_comparison_table
    from finetune.pipeline.stages import evaluate_stage

    if against not in ("base", "champion"):
        raise typer.BadParameter("expected base or champion", param_hint="--against")
    settings = settings_from(config, overrides)
    report = evaluate_stage(settings, adapter, against_champion=against == "champion")
    Console().print(format_comparison_table(report))


@app.command()
@user_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    adapter: Annotated[
        str | None, typer.Option(help="Bundle directory, <store>/runs/<run_id> or <store>/champion.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: the one the bundle was trained on).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Maximum new tokens.")] = 64,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Answer a prompt with base + adapter, using the chat template the adapter was trained with."""
    from finetune.pipeline.stages import generate_text

    settings = settings_from(config, overrides)
    answer = generate_text(
        settings, prompt, adapter, model, max_tokens, on_text=lambda piece: print(piece, end="", flush=True)
    )
    print()
    if not answer:
        console.print("(no text: the model ended its turn at once; the tiny demo model often does)", highlight=False)


@app.command("tiny-model")
@user_errors
def tiny_model(out: Annotated[Path, typer.Argument(help="Directory to write the model to.")]) -> None:
    """Build the tiny random-init Llama used by the demo and the tests."""
    from finetune.model.tiny import build_tiny_model

    path = build_tiny_model(out)
    typer.echo(f"tiny model written to {path}")


def run_pipeline(settings: Settings, run_id: str | None = None, fresh: bool = False, force: bool = False) -> dict:
    """Check what can be checked cheaply, then run the Prefect flow (ephemeral API unless PREFECT_API_URL is set)."""
    from finetune.pipeline.stages import preflight

    preflight(settings)
    # Prefect's ephemeral server needs ~18 s to start on a small machine; its default timeout is 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The library logs through `logging`; this sends its records to the run's logs in the UI too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "finetune")
    from finetune.pipeline.summary import flow_parameters
    from flows.finetune import finetune_pipeline

    # Credentials from a config file reach the flow through this process's environment, never as parameters.
    secrets = {
        f"FINETUNE_STORAGE__{field.upper()}": value.get_secret_value()
        for field in SECRET_FIELDS
        if (value := getattr(settings.storage, field)) is not None
    }
    saved = {name: os.environ.get(name) for name in secrets}
    os.environ.update(secrets)
    run_id = run_id or new_run_id()
    try:
        with run_log(settings.work_dir, run_id):
            return finetune_pipeline(
                **flow_parameters(settings), run_id=run_id, fresh=fresh, force=force, skip_if_unchanged=True
            )
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def print_summary(result: dict) -> None:
    metrics = result["metrics"]
    base, cand = metrics["base"], metrics["candidate"]
    out = Console()
    out.print()
    out.print(f"[bold]run[/] {result['run_id']}")
    if result.get("skipped"):
        out.print(f"skipped: {result['reason']}", highlight=False)
    out.print(f"validation loss: base {base['val_loss']:.4f} -> adapter {cand['val_loss']:.4f}", highlight=False)
    out.print(f"perplexity:      base {base['val_ppl']:.2f} -> adapter {cand['val_ppl']:.2f}", highlight=False)
    out.print(f"published to {result['bundle_uri']}", highlight=False)
    for export in result.get("exports") or []:
        checks = ", ".join(
            f"{name} {f.get('max_abs_logit_error', f.get('max_abs_error')):.3g}"
            for name, f in export["verification"].items()
        )
        out.print(f"  export {export['format']}: {export['path']}/ (verified max |Δ|: {checks})", highlight=False)
    verdict = {True: "promoted to champion", False: "not promoted", None: "unchanged"}[result["promoted"]]
    if result.get("skipped"):
        verdict = "unchanged"
    out.print(f"champion: {verdict} ({result['promotion_reason']})", highlight=False)
    out.print("try it:", highlight=False)
    out.print(
        f"  {command_name()} generate --adapter {result['bundle_uri']} 'What is the capital of France?'",
        highlight=False,
        soft_wrap=True,
    )


def command_name() -> str:
    """How the user can call finetune again: plain `finetune` when it is on PATH, else the venv's script."""
    script = Path(sys.argv[0])
    if shutil.which("finetune") == str(script.resolve()) or script.name != "finetune":
        return "finetune"
    try:
        return str(script.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _register_subcommands() -> None:
    from finetune.cli import data, export, store
    from finetune.cli.sweep import sweep

    app.add_typer(data.app, name="data")
    store.register(app)
    export.register(app)
    app.command()(user_errors(sweep))


_register_subcommands()


def main() -> None:
    from finetune.train.blas import reexec_with_openblas

    reexec_with_openblas()
    app()


if __name__ == "__main__":
    main()
