"""Help texts that name a registry's entries, filled in when a command's `--help` is shown.

`{methods}` becomes the feature-imitation methods of `kdcli.distill`, `{backbones}` the BACKBONES table of
`kdcli.models.backbones`, `{formats}` the FORMATS of `kdcli.deploy.formats`. These registries import torch:
reading them when the CLI is imported would add a second to every `kdcli` call, so a command whose help names
them is built with `cls=ListingCommand` and reads them only to print its help. (Sources import nothing heavy:
`kdcli prepare` lists them directly.)
"""

from __future__ import annotations

from typing import Any, Callable

from typer.core import TyperCommand


def method_list() -> str:
    from kdcli.config.schema import method_names

    return ", ".join(method_names())


def backbone_list() -> str:
    from kdcli.models.backbones import BACKBONES

    return ", ".join(BACKBONES)


def format_list() -> str:
    from kdcli.deploy.formats import FORMATS

    return ", ".join(FORMATS)


LISTS: dict[str, Callable[[], str]] = {"{methods}": method_list, "{backbones}": backbone_list,
                                       "{formats}": format_list}


def fill(text: str | None) -> str | None:
    for key, names in LISTS.items():
        if text and key in text:
            text = text.replace(key, names())
    return text


class ListingCommand(TyperCommand):
    """A command whose description and option helps may name `{methods}`, `{backbones}` or `{formats}` (not in
    the first line: the parent's command list shows that unfilled)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.help = fill(self.help)
        for p in self.params:
            p.help = fill(getattr(p, "help", None))  # type: ignore[attr-defined]
        super().format_help(ctx, formatter)
