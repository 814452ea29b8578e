"""``shardkit show --html DIR``: a static page of samples that opens from ``file://``.

``DIR/index.html`` lists every sample as a figure: its thumbnail (``DIR/thumbs/NNNNN.jpg``,
beside the page), key, caption and the sample as JSON (in a collapsed block). Everything
is rendered into the HTML itself, so the page reads without JavaScript and needs no
server; a few lines of plain JavaScript add the key filter (a text box; ``#key=TEXT`` in
the address fills it on load) and keep the "N of M samples" count.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence

from .sheet import CaptionFont, Tile, tile_picture

THUMB = 256  # thumbnail side in pixels

STYLE = """
body { font: 14px/1.4 system-ui, "DejaVu Sans", sans-serif; margin: 0; background: #fafafa; color: #222; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: 8px 16px;
  display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
header h1 { font-size: 16px; margin: 0; overflow-wrap: anywhere; }
#filter { font-size: 14px; padding: 4px 8px; min-width: 16em; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px; padding: 16px; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 8px; }
figure.bad { border-color: #a00; }
figure img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #eee; display: block; }
figcaption { margin-top: 6px; overflow-wrap: anywhere; }
.key { font-family: ui-monospace, monospace; color: #555; display: block; }
.sizes { color: #888; font-size: 12px; }
.caption { white-space: pre-wrap; display: block; }
.error { color: #a00; white-space: pre-wrap; display: block; }
pre { font-size: 12px; white-space: pre-wrap; overflow-wrap: anywhere; background: #f4f4f4;
  padding: 6px; margin: 4px 0 0; }
"""

SCRIPT = """
(function () {
  var input = document.getElementById("filter");
  var count = document.getElementById("count");
  var figures = Array.prototype.slice.call(document.querySelectorAll("figure.sample"));
  function apply() {
    var q = input.value.trim().toLowerCase();
    var shown = 0;
    figures.forEach(function (f) {
      var ok = !q || f.getAttribute("data-key").toLowerCase().indexOf(q) !== -1;
      f.hidden = !ok;
      if (ok) { shown += 1; }
    });
    count.textContent = shown + " of " + figures.length + " samples";
    document.body.setAttribute("data-shown", String(shown));
  }
  var m = /^#key=(.*)$/.exec(location.hash);
  if (m) { input.value = decodeURIComponent(m[1]); }
  input.addEventListener("input", apply);
  apply();
})();
"""


def _figure(i: int, tile: Tile, thumb: str) -> str:
    e = html.escape
    meta = json.dumps(tile.meta, indent=1, ensure_ascii=False, default=str)
    text = (
        f'<span class="error">undecodable: {e(tile.error)}</span>'
        if tile.error is not None
        else f'<span class="caption">{e(tile.caption)}</span>'
    )
    sizes = f' <span class="sizes">{e(tile.sizes)}</span>' if tile.sizes else ""
    return (
        f'<figure class="sample{" bad" if tile.error is not None else ""}" data-key="{e(tile.key)}" id="s{i}">'
        f'<img src="{e(thumb)}" alt="{e(tile.key)}" loading="lazy">'
        f'<figcaption><span class="key">{e(tile.key)}{sizes}</span>{text}</figcaption>'
        f"<details><summary>JSON</summary><pre>{e(meta)}</pre></details></figure>"
    )


def write_html(tiles: Sequence[Tile], dest: str, *, title: str, font: CaptionFont | None = None) -> str:
    """Write ``dest/index.html`` and its thumbnails for ``tiles``; return the page's path."""
    font = font or CaptionFont()
    thumbs = os.path.join(dest, "thumbs")
    os.makedirs(thumbs, exist_ok=True)
    figures = []
    for i, tile in enumerate(tiles):
        name = f"thumbs/{i:05d}.jpg"
        tile_picture(tile, THUMB, font).save(os.path.join(dest, name), quality=88)
        figures.append(_figure(i, tile, name))
    bad = sum(t.error is not None for t in tiles)
    page = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>shardkit show: {html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1>"
        '<input id="filter" type="search" placeholder="filter by key" aria-label="filter by key">'
        f'<span id="count">{len(tiles)} samples</span>'
        + (f'<span class="error">{bad} undecodable</span>' if bad else "")
        + "</header>\n<main>\n"
        + "\n".join(figures)
        + f"\n</main>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
    path = os.path.join(dest, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
