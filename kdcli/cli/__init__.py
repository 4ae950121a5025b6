"""The Typer CLI: argument parsing and printing only; every command calls one function of the library."""
