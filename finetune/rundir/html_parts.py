"""The pieces every report page is made of: escaping, numbers, inline PNGs, tables,
closed sections and the page itself (no script: its Content-Security-Policy forbids any).
Everything a run dir holds is received data: each text is escaped here, once."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from finetune.compose import safe_files
from finetune.errors import FinetuneError

MAX_IMAGE_BYTES = 16 << 20  # a plot of a run; anything larger is not one
_PNG_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/]+={0,2}")
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}h1{font-size:1.5em}
h2{font-size:1.1em;display:inline;margin:0}summary{cursor:pointer;padding:.35em 0;
border-bottom:1px solid #ddd}section{margin-top:.3em}
.verdict{border:1px solid #ccc;border-radius:4px;padding:.2em 1em;margin:.6em 0}
.verdict.tested{border-color:#99a;background:#f6f7fb}.verdict.badbox{border-color:#d88;
background:#fdf3f3}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f5f5f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
code,pre{background:#f6f8fa;border-radius:3px}pre{padding:.6em;overflow:auto;max-height:28em}
img.plot{max-width:100%;border:1px solid #eee}.muted{color:#777}
.wrong{display:inline-block;margin:.4em;text-align:center;font-size:12px;vertical-align:top}
.wrong img{width:96px;height:96px;image-rendering:pixelated;border:2px solid #c33;display:block}
.worst{display:inline-block;margin:.4em;font-size:12px;vertical-align:top}
.worst img{max-width:192px;border:1px solid #ccc;display:block}
.bad{color:#b00}.ok{color:#070}section{overflow-x:auto}
table.board{width:100%;font-size:12px}table.board td,table.board th{padding:.2em .35em}
table.board td.n,table.board td.k{white-space:nowrap}table.board td.t{overflow-wrap:anywhere}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return esc(value if value is not None else "—")
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def short(value: int | float) -> str:
    """A leaderboard number: 4 significant digits (a learning rate of 0.00072 stays
    readable), thousands separated."""
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else num(value)


def png_uri(path: Path) -> str | None:
    """A PNG file of the run dir as a data: URI (None when absent or not a PNG)."""
    if not path.is_file() or path.is_symlink():
        return None
    with open(path, "rb") as handle:
        data = handle.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES or not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode()


def img(uri: str | None, alt: str, cls: str = "plot") -> str:
    if not uri or not _PNG_URI.fullmatch(uri):
        return f'<p class="muted">({esc(alt)}: not available)</p>'
    return f'<img class="{cls}" alt="{esc(alt)}" src="{uri}">'


def table(header: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="n">{num(v)}</td>' if i in numeric else f"<td>{esc(v)}</td>"
        for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return safe_files.load_json_object(path, what)
    except FinetuneError:
        return {}


def section(key: str, title: str, body: str, line: str = "", opened: bool = False) -> str:
    """A part of the page: on a run's page closed until opened (its first screen is the
    verdict), its title and one line saying what it holds."""
    said = f' <span class="muted">{esc(line)}</span>' if line else ""
    return (f'<section id="{key}"><details{" open" if opened else ""}><summary><h2>'
            f"{esc(title)}</h2>{said}</summary>{body}</details></section>")


def page(title: str, body: str) -> str:
    policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}</body></html>")
