"""The `radchain` command line. Each command group lives in flows/commands/<group>.py."""

from __future__ import annotations

import importlib
import pkgutil

import typer

import flows.commands

app = typer.Typer(
    name="radchain",
    help="Mine verified diagnostic reasoning chains from chest X-ray reports, and train on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _mod in sorted(m.name for m in pkgutil.iter_modules(flows.commands.__path__) if not m.name.startswith("_")):
    importlib.import_module(f"flows.commands.{_mod}").register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
