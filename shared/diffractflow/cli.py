"""Shared command-line scaffolding: every service's typer app gets ``--version`` and ``serve``; a program's fast exit
(:func:`run_and_exit`)."""
from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
from typing import Any, Callable, Optional

import typer
from pydantic import BaseModel, ValidationError


def run_and_exit(app: Callable[[], Any]) -> None:
    """Run a command-line app, then exit the way the interpreter would, minus tearing down every module.

    What a normal exit does is done here, in the interpreter's order: threads are shut down (idle thread pools told to
    stop, non-daemon threads joined), ``atexit`` handlers run (Prefect drains its logs and events there, logging
    flushes), the standard streams are flushed. Only the module teardown is skipped: with Prefect, matplotlib, h5py
    and pydantic loaded it takes 0.3-0.6 s after a command has finished (at the end of every ``process`` run). An
    exception that escapes ``app`` is left to the interpreter (traceback, normal exit)."""
    try:
        app()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    # CPython's own exit sequence (Py_FinalizeEx), up to the module teardown: private names, the interpreter's calls
    threading._shutdown()
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written anyway
            pass
    os._exit(code or 0)


def load_stage(spec: str):
    """Import ``"package.module:STAGE"``."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "STAGE")


def service_app(name: str, version: str, stage: str, help: str = "") -> typer.Typer:
    """A typer app for one service with ``--version`` and ``serve`` already wired to the runtime."""
    app = typer.Typer(name=name, help=help or name, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_show_locals=False)

    def _version(value: bool):
        if value:
            typer.echo(f"{name} {version}")
            raise typer.Exit()

    @app.callback()
    def _main(
        version_: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                help="Print the version and exit."),
    ):
        pass

    @app.command()
    def serve(
        nats_url: Optional[str] = typer.Option(None, envvar="DIFFRACTFLOW_NATS_URL", help="NATS server URL."),
        volume: Optional[str] = typer.Option(None, envvar="DIFFRACTFLOW_VOLUME", help="Shared volume root."),
        concurrency: Optional[int] = typer.Option(None, envvar="DIFFRACTFLOW_CONCURRENCY", help="Jobs at once in this process."),
    ):
        """Run as a bus worker: take jobs from NATS (jobs.<service>) until SIGTERM.

        Credentials come from DIFFRACTFLOW_NATS_USER and DIFFRACTFLOW_NATS_PASSWORD(_FILE).
        """
        # the worker runtime (NATS client, pydantic-settings: ~0.2 s) only for `serve`, not every --help
        from .config import Settings
        from .runtime import serve_stage

        overrides = {k: v for k, v in dict(nats_url=nats_url, volume=volume, concurrency=concurrency).items() if v is not None}
        serve_stage(load_stage(stage), Settings(**overrides))

    return app


def model_option(model: type[BaseModel], name: str, *decls: str, default: Any = ..., help: str = "") -> Any:
    """A typer option for field ``name`` of a service's parameter model: the model's default and description (plus
    ``help``), so a CLI never restates a default the bus worker uses."""
    f = model.model_fields[name]
    if default is ...:
        default = f.get_default(call_default_factory=True)
    return typer.Option(default, *decls, help=" ".join(x for x in ((f.description or "") + ".", help) if x != "."))


def validated(model: type[BaseModel], flags: Optional[dict[str, str]] = None, /, **values: Any) -> Any:
    """The model built from command-line values; on a bad value, exit 2 with a message naming the option as the
    user typed it (``flags``: model field -> option, where they differ; else ``--field-name``)."""
    try:
        return model(**values)
    except ValidationError as exc:
        def flag(loc: tuple) -> str:
            name = str(loc[0]) if loc else ""
            return (flags or {}).get(name, "--" + name.replace("_", "-"))

        msg = "; ".join(f"{flag(e['loc'])}: {e['msg']}" for e in exc.errors())
        typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
