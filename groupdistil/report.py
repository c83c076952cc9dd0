"""Shared helpers for human reports: Markdown and HTML tables, pages with embedded PNG plots.

Pipelines build their reports from these so every report looks the same and is one self-contained HTML file.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Sequence

from .io import atomic_write_text


def fmt(value: Any, digits: int = 3) -> str:
    """Format a number for a table: fixed digits, '-' for None/NaN."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_mean_std(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return fmt(mean, digits)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    head = "| " + " | ".join(headers) + " |"
    sep = "|" + "|".join("---" for _ in headers) + "|"
    body = ["| " + " | ".join(fmt(c, digits) for c in row) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(c, digits))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def html_image(png: Path, alt: str = "", width: int | None = None) -> str:
    """An <img> with the PNG embedded as base64, so the HTML file stands alone."""
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    w = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{w}>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
line-height:1.45;padding:0 1em}
h1{font-size:1.6em;border-bottom:2px solid #446;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#eef}td:first-child,th:first-child{text-align:left}tr:nth-child(even){background:#fafafa}
img{max-width:100%;border:1px solid #ddd;margin:.4em 0}.note{color:#555;font-size:.9em}
code{background:#f3f3f3;padding:0 .2em}
"""


def html_page(title: str, body_html: str) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body_html}</body></html>\n"
    )


def write_report_pair(run_dir: Path, title: str, md_body: str, html_body: str, stem: str = "report") -> None:
    """Write ``<stem>.md`` and ``<stem>.html`` atomically."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / f"{stem}.md", f"# {title}\n\n{md_body.strip()}\n")
    atomic_write_text(run_dir / f"{stem}.html", html_page(title, html_body))
