"""The terminal every `formcall` command prints to, its error exit, and the shared --data-dir option."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

# soft_wrap: a long id, token or URL is printed whole on one line (a terminal folds it for the
# eye, and a pipe or log gets it unbroken), never cut or wrapped mid-way.
console = Console(soft_wrap=True)
DataDir = Annotated[Path, typer.Option("--data-dir", help="Where the local stack keeps its state.")]


def fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(2)
