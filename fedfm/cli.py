"""Command line: ``fedfm run [CONFIG.yaml] [key=value ...]``."""

from __future__ import annotations

import logging
import os
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fedfm: federated foundation models.")
err_console = Console(stderr=True)


@app.command(context_settings={"allow_extra_args": False})
def run(
    args: Optional[List[str]] = typer.Argument(
        None, help="An optional CONFIG.yaml, then key=value overrides (e.g. federation.rounds=5 out=runs/x)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live progress display."),
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="RUN_DIR", help="Continue a killed run from its latest checkpoint (its own config)."
    ),
) -> None:
    """Run a federated job (the embedded default job when no config is given)."""
    from fedfm.errors import FedfmError

    args = list(args or [])
    config = None
    if args and "=" not in args[0]:
        config = args.pop(0)
    if quiet:
        args.append("progress=false")
    try:
        from fedfm.runner import run as run_job

        run_job(config, args, resume=resume)
    except FedfmError as err:
        err_console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/bold red]")
        raise typer.Exit(code=130)


@app.command()
def show_config(
    args: Optional[List[str]] = typer.Argument(None, help="An optional CONFIG.yaml, then key=value overrides."),
) -> None:
    """Print the resolved config (defaults filled in) as YAML."""
    import yaml

    from fedfm.config import load_config, to_dict
    from fedfm.errors import FedfmError

    args = list(args or [])
    config = args.pop(0) if args and "=" not in args[0] else None
    try:
        typer.echo(yaml.safe_dump(to_dict(load_config(config, args)), sort_keys=False))
    except FedfmError as err:
        err_console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2)


@app.command()
def export(
    run_dir: str = typer.Argument(..., help="A finished run folder (config.yaml + final_state.safetensors)."),
    out: Optional[str] = typer.Argument(None, help="Where to write the Hugging Face folder (default RUN_DIR/export)."),
) -> None:
    """Merge a run's trainable state into its base and save a Hugging Face model folder."""
    from fedfm.errors import FedfmError

    try:
        from fedfm.models.chain import export_run

        typer.echo(str(export_run(run_dir, out)))
    except FedfmError as err:
        err_console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
