"""Human reports: one builder (:class:`Doc`) for a Markdown file and a self-contained HTML page, and one PNG saver.

Every report (a run's, a comparison's) is built with :class:`Doc` and its figures saved with :func:`save_figure`,
so every report looks the same and is one HTML file with its plots embedded.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Sequence

from .io import atomic_path, atomic_write_text


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


def save_figure(fig: Any, png: Path, dpi: int = 110, **savefig: Any) -> Path:
    """Save a matplotlib figure as PNG atomically (``savefig``: more ``Figure.savefig`` options); returns ``png``."""
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **savefig)
    return Path(png)


class Doc:
    """A report built as Markdown and HTML side by side from the same calls; :meth:`write` writes both files."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []

    def raw(self, md: str, html_text: str) -> None:
        """Append content given in both formats (the HTML as it is: escape it yourself)."""
        self.md.append(md)
        self.html.append(html_text)

    def heading(self, text: str, level: int = 2) -> None:
        self.raw(f"{'#' * level} {text}", f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str, note: bool = False) -> None:
        """A paragraph; ``note``: set in the smaller grey type of explanations."""
        tag = "<p class='note'>" if note else "<p>"
        self.raw(text, f"{tag}{html.escape(text)}</p>")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> None:
        self.raw(md_table(headers, rows, digits), html_table(headers, rows, digits))

    def image(self, png: Path, alt: str, link: str | None = None) -> None:
        """A PNG, embedded in the HTML; the Markdown links ``link`` (default: the file name, for a PNG beside the
        report; give the path relative to the report otherwise)."""
        self.raw(f"![{alt}]({link or Path(png).name})", html_image(png, alt))

    def details(self, summary: str, inner: Doc) -> None:
        """``inner`` folded under ``summary`` in the HTML; in the Markdown, under ``summary`` in bold."""
        inner_md, inner_html = "\n\n".join(inner.md), "\n".join(inner.html)
        self.raw(f"**{summary}**\n\n{inner_md}",
                 f"<details><summary>{html.escape(summary)}</summary>{inner_html}</details>")

    def write(self, run_dir: Path, title: str, stem: str = "report") -> None:
        """Write ``<stem>.md`` and ``<stem>.html`` (titled ``title``) into ``run_dir``, each atomically."""
        run_dir = Path(run_dir)
        md_body = "\n\n".join(self.md).strip()
        atomic_write_text(run_dir / f"{stem}.md", f"# {title}\n\n{md_body}\n")
        atomic_write_text(run_dir / f"{stem}.html", html_page(title, "\n".join(self.html)))


def timing_note(machine: Any) -> str:
    """One sentence under a report's timings: the threads, cores and load they were measured with (indicative)."""
    if not isinstance(machine, dict):
        return ""
    busy = machine.get("busy_cores_at_start")
    others = "" if busy is None else f", {busy} core(s) in use by other processes when the threads were chosen"
    return (f"Timings are indicative: measured with {machine.get('torch_threads', '?')} torch thread(s) on "
            f"{machine.get('cpu_cores', '?')} core(s), load average {machine.get('load_average_at_start', '?')} "
            f"when training started and {machine.get('load_average_at_end', '?')} at the end{others}; other work "
            f"on the machine slows them.")
