"""A small report builder that writes the same content as Markdown and as self-contained-folder HTML."""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass
class Report:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self.blocks.append(("table", (list(headers), [[_fmt(c) for c in r] for r in rows])))

    def image(self, path: str | Path, caption: str) -> None:
        self.blocks.append(("image", (Path(path), caption)))

    # ---- writers ---------------------------------------------------------------------------
    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``report.md`` and ``report.html`` into ``folder``; images are linked relatively."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        md = [f"# {self.title}", ""]
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, data in self.blocks:
            if kind == "heading":
                level, text = data
                md += ["#" * level + " " + text, ""]
                body.append(f"<h{level}>{html.escape(text)}</h{level}>")
            elif kind == "paragraph":
                md += [str(data), ""]
                body.append(f"<p>{html.escape(str(data))}</p>")
            elif kind == "table":
                headers, rows = data
                md.append("| " + " | ".join(headers) + " |")
                md.append("|" + "---|" * len(headers))
                md += ["| " + " | ".join(r) + " |" for r in rows]
                md.append("")
                head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "image":
                path, caption = data
                rel = os.path.relpath(path, folder)
                md += [f"![{caption}]({rel})", f"*{caption}*", ""]
                body.append(f'<figure><img src="{html.escape(rel)}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        md_path = folder / "report.md"
        md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
                 "text-align:right}th{background:#eee}td:first-child{text-align:left}img{max-width:100%}"
                 "figcaption{font-style:italic;color:#555}")
        html_path = folder / "report.html"
        html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}"
                             f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n", encoding="utf-8")
        return md_path, html_path


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)
