"""The ``trainwarden`` command line (typer + rich).

Importing this module must stay light: it never imports torch, transformers,
trl, peft or datasets (a test proves it), so ``trainwarden status`` answers in a
fraction of a second on a busy GPU box.
"""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from supervisor import logging as tw_logging
from supervisor.config import Config, json_schema, load_config
from supervisor.demo import run_demo
from supervisor.errors import ConfigError, MissingExtra, TrainwardenError
from supervisor.loop import Supervisor
from supervisor.report import gather_status, render_checkpoints, render_status, run_prune
from supervisor.shell.journal import read_state
from trainer_child.protocol import EXIT_CONFIG, Layout

app = typer.Typer(
    name="trainwarden",
    help="Keep an LLM fine-tuning run alive overnight: supervise, validate checkpoints, recover.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


def _config_or_exit(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[bold red]invalid configuration[/] in {exc.source}:")
        for problem in exc.problems:
            err.print(f"  - {problem}", markup=False, highlight=False)
        err.print("Nothing was started and nothing was deleted. Fix the file and run again.")
        raise typer.Exit(EXIT_CONFIG) from None


def _output_dir(target: Path) -> Path:
    """Accept either an output_dir or a job file and return the output_dir."""
    if target.is_file():
        return _config_or_exit(target).output_dir
    if not target.exists():
        err.print(f"[red]{target} does not exist[/]: give an output_dir or a job file")
        raise typer.Exit(2)
    return target


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="The job file (YAML).")],
    log_format: Annotated[
        str, typer.Option("--log-format", help="auto (JSON unless a terminal), json or console")
    ] = "auto",
) -> None:
    """Supervise a job in the foreground until it completes (the systemd ExecStart)."""
    tw_logging.configure(json=None if log_format == "auto" else log_format == "json")
    # A watchdog kill (SIGABRT) or a fatal error then leaves the loop's stack in
    # the journal instead of nothing.
    faulthandler.enable()
    job = _config_or_exit(config)
    try:
        code = Supervisor(job).run()
    except TrainwardenError as exc:
        # Escaped: a storage error quotes the backend, whose brackets are not markup.
        err.print(f"[bold red]trainwarden:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    if code not in (0,):
        state = read_state(Layout(job.output_dir))
        reason = state.gave_up if state and state.gave_up else f"exit {code}"
        err.print(f"[bold red]trainwarden gave up:[/] {reason}", highlight=False)
    raise typer.Exit(code)


@app.command()
def status(
    target: Annotated[Path, typer.Argument(help="An output_dir or a job file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show a run's state, progress, newest valid checkpoint, restarts and disk."""
    report = gather_status(_output_dir(target))
    if as_json:
        sys.stdout.write(json.dumps(report, indent=1, default=str) + "\n")
    else:
        render_status(report, out)


@app.command()
def report(
    target: Annotated[Path, typer.Argument(help="An output_dir or a job file.")],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="PNG to write (default: OUTPUT_DIR/report.png)."),
    ] = None,
) -> None:
    """Draw the night: loss by step across attempts with failures, and a wall-clock timeline."""
    # Deferred: matplotlib is an optional extra and slow to import.
    from supervisor.plot import load_run, render_report  # noqa: PLC0415

    output_dir = _output_dir(target)
    try:
        path = render_report(load_run(output_dir), output or output_dir / "report.png")
    except MissingExtra as exc:
        err.print(f"[bold red]trainwarden:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    out.print(str(path), highlight=False, soft_wrap=True)  # a path is never broken


@app.command()
def checkpoints(
    output_dir: Annotated[Path, typer.Argument(help="The run's output_dir.")],
    deep: Annotated[bool, typer.Option("--deep", help="Re-hash every file (slow, exact).")] = False,
) -> None:
    """List checkpoints: valid, in progress, partial, corrupt, quarantined, with sizes."""
    render_checkpoints(_output_dir(output_dir), deep=deep, console=out)


@app.command()
def prune(
    output_dir: Annotated[Path, typer.Argument(help="The run's output_dir.")],
    keep_last: Annotated[
        int, typer.Option("--keep-last", min=1, help="Valid checkpoints to keep.")
    ],
    keep_best: Annotated[
        bool, typer.Option(help="Also keep trainer_state's best checkpoint.")
    ] = True,
    keep_every: Annotated[
        int | None, typer.Option("--keep-every", min=1, help="Also keep every N steps.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
) -> None:
    """Delete old valid checkpoints (never the newest valid one, never through a symlink)."""
    code = run_prune(
        _output_dir(output_dir),
        keep_last=keep_last,
        keep_best=keep_best,
        keep_every=keep_every,
        dry_run=dry_run,
        console=out,
    )
    raise typer.Exit(code)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the job file."""
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the demo run writes (recreated each time).")
    ] = Path("runs/demo"),
) -> None:
    """Train the built-in tiny job under supervision, killing it twice on the way."""
    raise typer.Exit(run_demo(directory, console=out))


def main() -> None:
    """Console-script entry point."""
    # Library log lines go to stderr at INFO, never stdout (status --json is parsed).
    tw_logging.configure()
    app()


if __name__ == "__main__":
    main()
