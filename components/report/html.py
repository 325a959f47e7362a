"""The report as one self-contained HTML page: inline CSS, PNGs as base64 data URIs.

Nothing here refers to anything outside the file (no CDN, no web font, no script), so the
page opens offline and can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import html

FLOAT_DIGITS = 6  # significant digits of the floats shown
MISSING = "n/a"

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; }
.meta { color: #666; font-size: 13px; }
.alerts { border: 2px solid #c62828; background: #ffebee; padding: 8px 16px; }
.ok { border: 2px solid #2e7d32; background: #e8f5e9; padding: 8px 16px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
img { max-width: 100%; display: block; margin: 8px 0; }
"""


def fmt(value) -> str:
    """Ints with thousands separators, floats to FLOAT_DIGITS significant digits, None as n/a."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{FLOAT_DIGITS}g}"
    return str(value)


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(table_id: str, header: list[str], rows: list[tuple[str | None, list]]) -> str:
    """A table; each row is (data-key or None, cells); numeric cells are right-aligned."""
    out = [f'<table id="{esc(table_id)}">', "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for key, cells in rows:
        attr = f' data-key="{esc(key)}"' if key else ""
        tds = []
        for index, cell in enumerate(cells):
            if index == 0 and key is not None:
                tds.append(f"<th>{esc(cell)}</th>")
            elif isinstance(cell, (int, float)) and not isinstance(cell, bool) or cell is None:
                tds.append(f'<td class="num">{esc(fmt(cell))}</td>')
            else:
                tds.append(f"<td>{esc(cell)}</td>")
        out.append(f"<tr{attr}>" + "".join(tds) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def side_by_side(*parts: str) -> str:
    return '<div class="row">' + "".join(f"<div>{part}</div>" for part in parts) + "</div>"


def alerts_block(alerts: list[dict]) -> str:
    if not alerts:
        return '<div class="ok" id="alerts"><strong>No alerts.</strong> Every check passed.</div>'
    items = "".join(
        f'<li data-alert="{esc(a["name"])}"><strong>{esc(a["name"])}</strong> '
        f"({esc(a['basis'])}): {esc(a['message'])}</li>"
        for a in alerts
    )
    return f'<div class="alerts" id="alerts"><strong>{len(alerts)} alert(s)</strong><ul>{items}</ul></div>'


def page(title: str, meta: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document; sections are (id, heading, inner HTML), headings may be empty."""
    body = []
    for section_id, heading, inner in sections:
        head = f"<h2>{esc(heading)}</h2>" if heading else ""
        body.append(f'<section id="{esc(section_id)}">{head}\n{inner}\n</section>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        f'<h1>{esc(title)}</h1><div class="meta">{meta}</div>\n' + "\n".join(body) + "\n</body></html>\n"
    )
