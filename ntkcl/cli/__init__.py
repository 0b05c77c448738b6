"""The `ntkcl` command line (Typer). One module per subcommand; parsing and printing only.

Exit codes: 0 success, 2 bad input (one line on stderr, never a traceback), 1 the run itself failed,
130 interrupted. With `--json` the result (or `{"ok": false, "error": ...}`, parser errors included) is the
only thing on stdout.

Start-up stays fast (`--help`, `--version`, completion, `ntkcl datasets`): the subcommand modules import
torch, timm and the engine only inside the commands that need them.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback

import typer
from pydantic import ValidationError
from typer.exceptions import TyperException

from ntkcl import __version__
from ntkcl.cli import _common
from ntkcl.errors import BadInputError, RunFailedError

app = typer.Typer(
    name="ntkcl",
    help="Parameter-efficient continual learning with pre-trained vision transformers (NTK-CL and peers).",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ntkcl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version."),
) -> None:
    """ntkcl: continual learning with PEFT on pre-trained ViTs."""


@functools.cache
def register_commands() -> typer.core.TyperGroup:
    """Attach every subcommand to `app` and build its command group, once (the modules import nothing heavy)."""
    from ntkcl.cli import datasets, diagnose, evaluate, export, prepare, report, reproduce, train

    for module in (datasets, prepare, train, evaluate, export, report, reproduce, diagnose):
        module.register(app)
    return typer.main.get_command(app)


def _asks_for_json(argv: list[str]) -> bool:
    """Whether `--json` is among the options, read before parsing so that parser errors honour it too."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: maps errors to exit codes and one-line messages."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _common.set_json(_asks_for_json(argv))
    _common.route_warnings()
    command = register_commands()
    try:
        command.main(args=argv, prog_name="ntkcl", standalone_mode=False)
    except typer.Exit as error:
        sys.exit(error.exit_code)
    except typer.Abort:
        _common.fail("aborted", 130)
    except TyperException as error:
        # Usage errors of the command-line parser (unknown option, missing argument, bad value).
        if type(error).__name__ == "NoArgsIsHelpError":  # the parser has already printed the help
            sys.exit(0)
        _common.fail(error.format_message(), getattr(error, "exit_code", 2))
    except BadInputError as error:
        _common.fail(str(error), 2)
    except ValidationError as error:  # a model validated outside `ntkcl.config.validate`: still bad input
        from ntkcl.config import describe_validation_error

        _common.fail(describe_validation_error(error), 2)
    except RunFailedError as error:
        _common.fail(str(error), 1)
    except KeyboardInterrupt:
        _common.fail("interrupted", 130)
    except Exception as error:
        # A failure of the run itself: one line (the traceback only when NTKCL_DEBUG is set).
        if os.environ.get("NTKCL_DEBUG"):
            traceback.print_exc()
        _common.fail(f"{type(error).__name__}: {error}", 1)
