"""The `kdcli` Typer app: command groups, `--version`, `--debug`, and the one place errors become exit codes.

A `KdcliError` prints as one red line (plus a hint) and exits with its code (2: fix the command or input,
1: the run failed); any other exception is a bug: one line saying so, or the traceback under `--debug` /
`KDCLI_DEBUG=1`.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from kdcli import __version__
from kdcli.console import err
from kdcli.errors import KdcliError


_state = {"debug": False}  # set by the root callback for this invocation


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("KDCLI_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


# Typer's own exceptions (usage errors, Exit, Abort) carry their exit codes and must pass through untouched.
_PASS_THROUGH = tuple({c for cls in (typer.BadParameter, typer.Exit, typer.Abort) for c in cls.__mro__
                       if c.__name__ in ("ClickException", "Exit", "Abort")})


class KdcliGroup(TyperGroup):
    """Runs a command and turns failures into one-line messages with meaningful exit codes."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except KdcliError as e:
            if debug_enabled():
                raise
            err.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False, soft_wrap=True)
            if e.hint:
                err.print(f"[dim]hint: {escape(e.hint)}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:
            raise  # `kdcli ... | head`: Typer exits quietly
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except OSError as e:
            if debug_enabled() or not e.filename:
                raise
            # the file system said no (permissions, a full disk, a path that is a file): name the path, not a bug
            err.print(f"[bold red]error:[/] {escape(str(e.filename))}: {escape(e.strerror or type(e).__name__)}",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as e:
            if debug_enabled():
                raise
            err.print(f"[bold red]internal error:[/] {escape(type(e).__name__)}: {escape(str(e))} "
                      "[dim](rerun with --debug for the traceback, and please report it)[/]",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=KdcliGroup,
    name="kdcli",
    help="Train object detectors and distil a big teacher into a small student for remote-sensing imagery.\n\n"
         "Example: [bold]kdcli prepare synthetic --kind vedai && kdcli prepare vedai --src "
         "datasets/raw/synthetic-vedai --res 25[/]",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks (also KDCLI_DEBUG=1).")] = False,
) -> None:
    """kdcli: knowledge distillation for object detection on remote-sensing imagery."""
    _state["debug"] = debug


def _register() -> None:
    from kdcli.cli import benchmark, data, deploy, distill, prepare, recipe, study, train
    from kdcli.cli.listing import ListingCommand

    app.command("train", rich_help_panel="Train and evaluate")(train.train)
    app.command("distill", rich_help_panel="Train and evaluate", cls=ListingCommand)(distill.distill)
    app.command("val", rich_help_panel="Train and evaluate")(train.val)
    app.command("compare", rich_help_panel="Train and evaluate")(train.compare)
    info = typer.Typer(help="Describe models.", no_args_is_help=True, rich_markup_mode="rich")
    info.command("model", cls=ListingCommand)(train.info_model)
    app.add_typer(info, name="info", rich_help_panel="Train and evaluate")
    app.command("study", rich_help_panel="Studies")(study.study)
    app.command("report", rich_help_panel="Studies")(study.report)
    app.command("quickstart", rich_help_panel="Studies")(study.quickstart)
    app.command("predict", rich_help_panel="Deploy and measure")(deploy.predict)
    app.command("export", rich_help_panel="Deploy and measure")(deploy.export)
    app.command("benchmark", rich_help_panel="Deploy and measure", cls=ListingCommand)(benchmark.benchmark)

    app.add_typer(prepare.app, name="prepare", rich_help_panel="Data")
    app.add_typer(data.app, name="data", rich_help_panel="Data")
    app.add_typer(recipe.app, name="recipe", rich_help_panel="Recipes")


_register()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="kdcli")
