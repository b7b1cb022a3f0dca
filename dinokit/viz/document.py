"""A small report document: headings, paragraphs, tables, figures, and the student's own text.

Rendered twice, to Markdown (``report.md``, the file a student edits) and to one self-contained
HTML file (figures embedded). Blocks of the student's text are marked in the Markdown::

    <!-- your text: discussion -->
    ...anything the student writes...
    <!-- end of your text -->

and read back from the previous ``report.md`` before it is rebuilt, so regenerating figures and
tables never overwrites what the student wrote.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

_STUDENT = re.compile(r"<!-- your text: ([\w-]+) -->\n(.*?)\n?<!-- end of your text -->", re.S)


def student_text(markdown_path: Path) -> dict[str, str]:
    """The student's blocks of an existing ``report.md`` (empty when there is none yet)."""
    if not markdown_path.is_file():
        return {}
    return {key: text.strip("\n") for key, text in _STUDENT.findall(markdown_path.read_text())}


@dataclass
class Block:
    kind: str  # "h2" | "h3" | "p" | "table" | "figure" | "missing" | "student" | "link"
    content: object


class Document:
    def __init__(self, out_dir: Path, previous: dict[str, str] | None = None) -> None:
        self.out_dir = out_dir
        self.fig_dir = out_dir / "figures"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.blocks: list[Block] = []
        self.previous = previous or {}

    def h2(self, text: str) -> None:
        self.blocks.append(Block("h2", text))

    def h3(self, text: str) -> None:
        self.blocks.append(Block("h3", text))

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def missing(self, what: str, command: str) -> None:
        self.blocks.append(Block("missing", (what, command)))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(Block("table", (header, rows)))

    def links(self, items: list[tuple[str, str]]) -> None:
        self.blocks.append(Block("link", items))

    def student(self, key: str, prompt: str) -> None:
        """A block for the student's own text: the prompt until they replace it, theirs after."""
        text = self.previous.get(key) or f"_Your text. {prompt}_"
        self.blocks.append(Block("student", (key, text)))

    def figure(self, fig, name: str, caption: str) -> None:
        png, pdf = self.fig_dir / f"{name}.png", self.fig_dir / f"{name}.pdf"
        fig.savefig(png, dpi=110, bbox_inches="tight", metadata={"Software": None})
        fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
        plt.close(fig)
        self.blocks.append(Block("figure", (name, caption)))

    def markdown(self, title: str) -> str:
        out = [f"# {title}", ""]
        for b in self.blocks:
            if b.kind in ("h2", "h3"):
                out += [f"{'#' * int(b.kind[1])} {b.content}", ""]
            elif b.kind == "p":
                out += [str(b.content), ""]
            elif b.kind == "missing":
                what, command = b.content
                out += [f"> **Missing:** {what}. Produce it with `{command}`.", ""]
            elif b.kind == "table":
                header, rows = b.content
                out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
            elif b.kind == "figure":
                name, caption = b.content
                out += [f"![{caption}](figures/{name}.png)", "", f"*{caption}*", ""]
            elif b.kind == "student":
                key, text = b.content
                out += [f"<!-- your text: {key} -->", text, "<!-- end of your text -->", ""]
            elif b.kind == "link":
                out += [" · ".join(f"[{label}]({target})" for label, target in b.content), ""]
        return "\n".join(out)

    def html(self, title: str) -> str:
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;"
            "line-height:1.45}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right}}img{{max-width:100%}}.missing{{background:#fff3cd;padding:.6em;border-left:4px solid "
            "#e0a800}}.student{{background:#eef6ff;padding:.4em .8em;border-left:4px solid #4a90d9}}"
            "figcaption{{color:#555;font-style:italic}}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
        ]
        for b in self.blocks:
            if b.kind in ("h2", "h3"):
                parts.append(f"<{b.kind}>{html.escape(str(b.content))}</{b.kind}>")
            elif b.kind == "p":
                parts.append(f"<p>{_inline(str(b.content))}</p>")
            elif b.kind == "missing":
                what, command = b.content
                parts.append(
                    f"<p class='missing'><b>Missing:</b> {html.escape(what)}. "
                    f"Produce it with <code>{html.escape(command)}</code>.</p>"
                )
            elif b.kind == "table":
                header, rows = b.content
                parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                for r in rows:
                    parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
                parts.append("</table>")
            elif b.kind == "figure":
                name, caption = b.content
                data = base64.b64encode((self.fig_dir / f"{name}.png").read_bytes()).decode()
                parts.append(
                    f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
            elif b.kind == "student":
                paragraphs = [p for p in str(b.content[1]).split("\n\n") if p.strip()]
                parts.append("<div class='student'>" + "".join(f"<p>{_inline(p)}</p>" for p in paragraphs) + "</div>")
            elif b.kind == "link":
                links = (f"<a href='{html.escape(t)}'>{html.escape(label)}</a>" for label, t in b.content)
                parts.append("<p>" + " · ".join(links) + "</p>")
        parts.append("</body></html>")
        return "\n".join(parts)


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown the report itself uses: `code` and _emphasis_."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"<i>\1</i>", out)


def sweep_files(bench_dir: Path) -> list[Path]:
    """The generic sweeps' result files in ``bench_dir``; a run's own study (``assignment-*``) is read apart."""
    return [f for f in sorted(bench_dir.glob("*.json")) if not f.name.startswith("assignment-")]


def bench_files_for(files: list[Path], device: str, preset: str) -> tuple[list[Path], list[Path]]:
    """The sweep files (:func:`sweep_files`) of this run's device (those named after its preset, if
    any), and the rest."""
    ours = [f for f in files if (json.loads(f.read_text()) or [{}])[0].get("device") == device]
    named = [f for f in ours if preset and preset in f.stem]
    chosen = named or ours
    return chosen, [f for f in files if f not in chosen]
