"""Command line: ``fedfm run [CONFIG.yaml] [key=value ...]``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
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
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Clear the folder out= when it already holds files (default: refuse)."
    ),
) -> None:
    """Run a federated job (the embedded default job when no config is given)."""
    from fedfm.errors import FedfmError
    from fedfm.run_folder import describe_os_error

    args = list(args or [])
    config = None
    if args and "=" not in args[0]:
        config = args.pop(0)
    if quiet:
        args.append("progress=false")
    try:
        from fedfm.runner import run as run_job

        run_job(config, args, resume=resume, overwrite=overwrite)
    except FedfmError as err:
        _fail(err)
    except OSError as err:  # the run converts those on its folder; anything else still gets one line
        _fail(describe_os_error(err))
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


@app.command()
def compare(
    run_dirs: Optional[List[str]] = typer.Argument(None, help="Run folders (finished or not) to put side by side."),
    png: str = typer.Option("compare.png", "--png", metavar="FILE", help="Where to write the overlaid curves."),
    metric: Optional[str] = typer.Option(
        None, "--metric", metavar="NAME", help="The metric to plot (default: test accuracy, or perplexity)."
    ),
) -> None:
    """Compare runs: final metrics, bytes, wall time and differing config keys; their curves in one PNG."""
    from fedfm.errors import FedfmError

    try:
        from rich.measure import Measurement

        from fedfm.eval.compare import compare_runs, plot_runs, render_table, resolve_metric

        result = compare_runs(list(run_dirs or []))
        path = plot_runs(result.runs, resolve_metric(result.runs, metric), png)
        console = Console()
        table = render_table(result)
        if not console.is_terminal:  # piped output: as wide as the table, no column cut short
            wide = Measurement.get(console, console.options.update_width(10**4), table).maximum
            console = Console(width=max(console.width, wide))
        console.print(table)
        console.print(f"plot: {path}", highlight=False, soft_wrap=True)
    except FedfmError as err:
        _fail(err)


def _own_test_rows(cfg, ds):
    """The run's global test rows, cut as the run cut them (fedfm.build; a deployed server's own file whole)."""
    import numpy as np

    from fedfm.build import limit_test, split_holdout

    if cfg.deploy.test_data is not None:
        return limit_test(cfg, np.arange(len(ds.texts), dtype=np.int64))
    return limit_test(cfg, split_holdout(cfg, ds)[1])


@app.command("eval", context_settings={"allow_extra_args": False})
def eval_run(
    run_dir: str = typer.Argument(..., help="A finished run folder (config.yaml + final_state.safetensors)."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="key=value overrides of the run's config (e.g. data.text_column=body data.label_column=topic)."
    ),
    data: Optional[str] = typer.Option(
        None, "--data", metavar="FILE", help="csv/jsonl/json/parquet file or .txt file/folder (default: the run's test set)."
    ),
    json_out: Optional[str] = typer.Option(None, "--json", metavar="FILE", help="Also write the results as JSON."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Rows per forward pass (eval.batch_size)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Evaluate a run's final model on its test set or a file: metrics and a per-class table."""
    from fedfm.errors import FedfmError

    try:
        from fedfm.eval.report import write_json
        from fedfm.eval.use import evaluate_run, load_run, print_evaluation

        result = evaluate_run(load_run(run_dir, overrides or [], device), data, _own_test_rows, batch_size)
        print_evaluation(result, Console())
        if json_out:
            write_json(Path(json_out), result)
    except FedfmError as err:
        _fail(err)
    except OSError as err:
        _fail(f"{getattr(err, 'filename', None) or json_out}: {err.strerror or err}")


@app.command(context_settings={"allow_extra_args": False})
def predict(
    run_dir: str = typer.Argument(..., help="A finished run folder (config.yaml + final_state.safetensors)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides (e.g. data.text_column=body)."),
    data: Optional[str] = typer.Option(None, "--data", metavar="FILE", help="Rows to predict (any format a run reads)."),
    text: List[str] = typer.Option([], "--text", help="A text to predict (repeat for several)."),
    out: Optional[str] = typer.Option(None, "--out", metavar="FILE", help="Write every prediction (.jsonl or .csv)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Causal LM: tokens to generate per row."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Rows per forward pass (eval.batch_size)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Predict with a run's final model: labels with probabilities, or generated text for a causal LM."""
    from fedfm.errors import FedfmError

    try:
        from fedfm.eval.predict import check_out_path, write_predictions
        from fedfm.eval.use import load_run, predict_run, print_predictions

        if out:
            check_out_path(out)
        if (data is None) == (not text):
            raise FedfmError('give rows to predict: either --data FILE or --text "..." (not both)')
        records = predict_run(load_run(run_dir, overrides or [], device), data, text, batch_size, max_new_tokens)
        print_predictions(records, Console())
        if out:
            typer.echo(str(write_predictions(records, out)))
    except FedfmError as err:
        _fail(err)
    except OSError as err:
        _fail(f"{getattr(err, 'filename', None) or out}: {err.strerror or err}")


deploy_app = typer.Typer(no_args_is_help=True, help="Deploy on Flower: a SuperLink, nodes with local data, runs.")
app.add_typer(deploy_app, name="deploy")


def _fail(err) -> None:
    err_console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@deploy_app.command("credentials")
def deploy_credentials(
    folder: str = typer.Argument(..., help="Where to write ca.crt, server.pem/.key and the node keys."),
    host: List[str] = typer.Option(["127.0.0.1", "localhost"], "--host", help="A name or IP nodes dial (repeat)."),
    node: List[str] = typer.Option([], "--node", help="Write a key pair for this node name (repeat)."),
) -> None:
    """TLS certificates for the SuperLink and authentication keys for the nodes."""
    from pathlib import Path

    from fedfm.deploy.credentials import make_node_key, make_tls
    from fedfm.errors import FedfmError

    try:
        for path in list(make_tls(Path(folder), host).values()) + [
                p for n in node for p in make_node_key(Path(folder), n).values()]:
            typer.echo(str(path))
    except FedfmError as err:
        _fail(err)


@deploy_app.command("superlink")
def deploy_superlink(
    address: str = typer.Option("127.0.0.1:9093", help="HOST:PORT to serve on (0.0.0.0:PORT for other machines)."),
    state: str = typer.Option("superlink-state", help="Folder for the SuperLink's database and installed apps."),
    certs: Optional[str] = typer.Option(None, help="A `fedfm deploy credentials` folder (TLS)."),
    auth: bool = typer.Option(True, help="Only registered nodes may connect (`fedfm deploy register`)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP, unencrypted, no node authentication."),
) -> None:
    """Start the server side: Flower's SuperLink (the ServerApp runs under it when a run is submitted)."""
    from pathlib import Path

    from fedfm.deploy.launch import superlink
    from fedfm.errors import FedfmError

    files = {k: None if certs is None else str(Path(certs) / f) for k, f in
             (("ca", "ca.crt"), ("cert", "server.pem"), ("key", "server.key"))}
    try:
        raise typer.Exit(code=superlink(address, state, insecure=insecure, auth=auth and not insecure, **files))
    except FedfmError as err:
        _fail(err)


@deploy_app.command("register")
def deploy_register(
    public_key: str = typer.Argument(..., help="The node's NAME.pub from `fedfm deploy credentials --node NAME`."),
    superlink: str = typer.Option("127.0.0.1:9093", help="The SuperLink's HOST:PORT."),
    root_certificates: Optional[str] = typer.Option(None, help="The CA certificate (ca.crt) of the SuperLink."),
    insecure: bool = typer.Option(False, "--insecure", help="The SuperLink runs without TLS."),
) -> None:
    """Allow a node's key on a SuperLink started with node authentication."""
    from fedfm.deploy.launch import register
    from fedfm.errors import FedfmError

    try:
        raise typer.Exit(code=register(public_key, superlink, root_certificates, insecure))
    except FedfmError as err:
        _fail(err)


@deploy_app.command("node")
def deploy_node(
    data: str = typer.Option(..., help="This node's own data file (or folder of .txt); it never leaves the node."),
    superlink: str = typer.Option("127.0.0.1:9093", help="The SuperLink's HOST:PORT."),
    name: Optional[str] = typer.Option(None, help="The node's name (its client id follows it); default: hostname."),
    state: str = typer.Option("node-state", help="Folder for the node's worker socket and private client state."),
    root_certificates: Optional[str] = typer.Option(None, help="The CA certificate (ca.crt) of the SuperLink."),
    key: Optional[str] = typer.Option(None, help="The node's private key (NAME.key) for node authentication."),
    threads: Optional[int] = typer.Option(None, min=1, help="Torch threads for local training."),
    insecure: bool = typer.Option(False, "--insecure", help="The SuperLink runs without TLS."),
) -> None:
    """Start one edge node: fedfm's resident worker (model and data in memory) and Flower's SuperNode."""
    from fedfm.deploy.launch import node
    from fedfm.errors import FedfmError

    try:
        raise typer.Exit(code=node(data, superlink, state, name=name, threads=threads, insecure=insecure,
                                   root_certificates=root_certificates, auth_key=key))
    except FedfmError as err:
        _fail(err)


@deploy_app.command("submit", context_settings={"allow_extra_args": False})
def deploy_submit(
    args: Optional[List[str]] = typer.Argument(None, help="An optional CONFIG.yaml, then key=value overrides."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run folder out= from its latest checkpoint."),
    stream: bool = typer.Option(True, help="Follow the run's log until it ends."),
) -> None:
    """Submit a run to the SuperLink named by deploy.superlink (the same YAML as `fedfm run`)."""
    from fedfm.config import load_config
    from fedfm.deploy.launch import submit
    from fedfm.errors import FedfmError

    args = list(args or [])
    config = args.pop(0) if args and "=" not in args[0] else None
    try:
        raise typer.Exit(code=submit(load_config(config, args), resume=resume, stream=stream))
    except FedfmError as err:
        _fail(err)


@deploy_app.command("log", context_settings={"allow_extra_args": False})
def deploy_log(
    run_id: int = typer.Argument(..., help="The run id `fedfm deploy submit` printed."),
    args: Optional[List[str]] = typer.Argument(None, help="The run's CONFIG.yaml and overrides (for deploy.*)."),
) -> None:
    """Follow a submitted run's log until it ends; exit 0 only when it completed."""
    from fedfm.config import load_config
    from fedfm.deploy.launch import follow
    from fedfm.errors import FedfmError

    args = list(args or [])
    config = args.pop(0) if args and "=" not in args[0] else None
    try:
        raise typer.Exit(code=follow(run_id, load_config(config, args)))
    except FedfmError as err:
        _fail(err)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
