"""Shared CLI plumbing: clear one-line errors (exit code 2), settings, output formats."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import pyarrow as pa
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class UsageError(Exception):
    """Unusable arguments or input: printed as one line, exit code 2."""


# Characters that must not reach a terminal raw: C0/C1 controls, DEL, bidi overrides and isolates.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
MAX_ERROR_CHARS = 1000


def one_line(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """An error message as one printable line: line breaks and runs of blanks become one space,
    other control characters are shown escaped, and an overlong message is cut."""
    text = " ".join(message.split())
    text = _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text if len(text) <= limit else text[:limit] + " ..."


# In table cells line breaks and tabs stay (report text has them); every other control character,
# ESC of ANSI/OSC-8 sequences included, is shown as a visible \\uXXXX escape.
_UNPRINTABLE_IN_CELL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def printable(text: str) -> str:
    """Text from the data as safe terminal output: control characters (ESC, BEL, CR, C1, bidi
    overrides ...) become visible ``\\uXXXX`` escapes; line breaks and tabs are kept."""
    return _UNPRINTABLE_IN_CELL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def cell(value: Any) -> Text:
    """A table cell: data, never Rich markup ("[bold]x[/bold]" and "[/path]" print as written),
    never a terminal escape sequence, never syntax-highlighted."""
    return Text("" if value is None else printable(str(value)))


def clear_errors(fn: F) -> F:
    """Turn expected failures into one line on stderr and exit code 2, never a traceback."""
    from warehouse import WarehouseError

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UsageError, WarehouseError, FileNotFoundError, ValueError) as e:
            # escape(): text from the input (a column name such as "[/x]") is not Rich markup.
            err_console.print(f"[bold red]error:[/] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


# A cell starting with one of these is run as a formula by Excel, LibreOffice and Google Sheets
# (OWASP "CSV injection"); report text is untrusted input, so such text cells get a leading "'".
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value as written to CSV: text that a spreadsheet would run as a formula is defused."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def table_console() -> Console:
    """The console to print a wide table on: on a terminal its width; elsewhere (a pipe, a log
    file, a test runner) wide enough that no column is cut or folded to fit 80 columns."""
    if console.is_terminal:
        return console
    return Console(file=sys.stdout, width=UNLIMITED_WIDTH, color_system=None, highlight=False)


# The width a table may take when stdout is not a terminal (Rich's default there is 80).
UNLIMITED_WIDTH = 100_000


def print_arrow(table: pa.Table, fmt: str = "table", title: str | None = None) -> None:
    rows = table.to_pylist()
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, default=str, indent=None) + "\n")
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([csv_cell(c) for c in table.column_names])
        for r in rows:
            w.writerow([csv_cell(r[c]) for c in table.column_names])
        sys.stdout.write(buf.getvalue())
    elif fmt == "table":
        t = Table(title=None if title is None else cell(title))
        for c in table.column_names:
            t.add_column(cell(c))
        for r in rows:
            t.add_row(*(cell(r[c]) for c in table.column_names))
        table_console().print(t)
    else:
        raise UsageError(f"unknown format {fmt!r}: use table, csv or json")
