"""The self-contained HTML report of `rnngen inspect`: one file, no network, no libraries.

The page shows the text coloured by a chosen unit's activation (or by surprise or
entropy), a picker for the unit, and the units that best track each feature. Activations
travel quantized to int8 per unit (scaled by the unit's largest |value|), base64 encoded:
a few hundred units over a few thousand characters stay around a megabyte.
"""

from __future__ import annotations

import base64
import html
import json

import numpy as np

from rnngen.inspect.recording import Analysis
from rnngen.model.units import Unit


def report_units(analysis: Analysis, extra: list[Unit], layer_kinds: tuple[str, ...] = ("h",)) -> list[Unit]:
    """Units the page can show: every feature's top units, the user's, and every unit of the last layer's h."""
    rec = analysis.recording
    last = max(u.layer for u in rec.units)
    chosen: dict[Unit, None] = {}
    for f in analysis.features:
        for u, _ in f.top:
            chosen[u] = None
    for u in extra:
        chosen[u] = None
    for u in rec.units:
        if u.layer == last and u.kind in layer_kinds:
            chosen[u] = None
    return list(chosen)


def render_report(analysis: Analysis, model_name: str, model_summary: str, units: list[Unit],
                  show_chars: int) -> str:
    rec = analysis.recording
    text = analysis.text
    chars = min(len(text), show_chars)
    # Tokens whose character is shown; per shown character, the last token ending in it.
    token_of_char = np.full(chars, -1, dtype=np.int64)
    shown_tokens = np.flatnonzero(analysis.char_index < chars)
    token_of_char[analysis.char_index[shown_tokens]] = shown_tokens
    token_of_char = np.maximum.accumulate(np.maximum(token_of_char, 0))

    unit_data = {}
    for u in units:
        # Coloured by the deviation from the unit's mean over the whole text: a gate that sits near 1
        # and drops at line ends shows those drops rather than a uniform colour.
        column = rec.column(u)
        centre = float(column.mean())
        deviation = column[token_of_char] - centre
        scale = float(np.abs(deviation).max()) or 1.0
        q = np.round(deviation / scale * 127).astype(np.int8)
        unit_data[u.name] = {"centre": round(centre, 5), "scale": round(scale, 5),
                             "q": base64.b64encode(q.tobytes()).decode("ascii")}
    data = {
        "model": model_name,
        "summary": model_summary,
        "text": text[:chars],
        "total_chars": len(text),
        "surprise": [round(float(x), 2) for x in rec.surprise_bits[token_of_char]],
        "entropy": [round(float(x), 2) for x in rec.entropy_bits[token_of_char]],
        "mean_surprise": round(float(rec.surprise_bits.mean()), 4),
        "mean_entropy": round(float(rec.entropy_bits.mean()), 4),
        "units": unit_data,
        "features": [{"name": f.name, "help": f.help, "source": f.source, "present": f.present,
                      "top": [[u.name, round(r, 3)] for u, r in f.top]} for f in analysis.features],
        "best": [[name, u.name, round(r, 3)] for name, u, r in analysis.best()],
    }
    payload = json.dumps(data, ensure_ascii=True).replace("</", "<\\/")  # safe inside <script>
    return _TEMPLATE.replace("__TITLE__", html.escape(f"rnngen inspect: {model_name}")).replace("__DATA__", payload)


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
 header { padding: 12px 20px; background: #263238; color: #eceff1; }
 header h1 { font-size: 18px; margin: 0 0 4px; }
 main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(280px, 2fr); gap: 16px; padding: 16px 20px; }
 section { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 12px 14px; }
 h2 { font-size: 15px; margin: 0 0 8px; }
 #controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-bottom: 10px; }
 #text { font: 13px/1.5 ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; max-height: 75vh; overflow: auto; }
 #text span { border-radius: 2px; }
 #hover { font: 12px ui-monospace, monospace; min-height: 1.5em; color: #555; }
 table { border-collapse: collapse; width: 100%; font-size: 13px; }
 td, th { border-bottom: 1px solid #eee; padding: 4px 6px; text-align: left; vertical-align: top; }
 button.unit { font: 12px ui-monospace, monospace; border: 1px solid #bbb; background: #f4f4f4; border-radius: 4px; padding: 1px 5px; margin: 1px; cursor: pointer; }
 button.unit.active { background: #ffe082; border-color: #f9a825; }
 .muted { color: #888; }
 .legend span { display: inline-block; width: 14px; height: 10px; margin: 0 2px; }
</style></head>
<body>
<header><h1 id="title"></h1><div id="summary"></div></header>
<main>
 <section>
  <div id="controls">
   <label>colour by <select id="mode">
     <option value="unit">unit activation</option>
     <option value="surprise">surprise (bits)</option>
     <option value="entropy">prediction entropy (bits)</option>
   </select></label>
   <label>unit <select id="unit"></select></label>
   <span class="legend">below the unit's mean <span style="background:rgb(38,139,210)"></span><span style="background:#fff;border:1px solid #ddd"></span><span style="background:rgb(220,50,47)"></span> above</span>
  </div>
  <div id="hover">hover over a character</div>
  <div id="text"></div>
 </section>
 <section>
  <h2>Units that best track each feature</h2>
  <p class="muted">Pearson r between the unit's activation after each character and the feature; click a unit to show it.</p>
  <table id="features"><thead><tr><th>feature</th><th>best units (r)</th></tr></thead><tbody></tbody></table>
  <h2 style="margin-top:14px">Surprise</h2>
  <p id="surprise"></p>
 </section>
</main>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const textBox = document.getElementById("text");
const unitSelect = document.getElementById("unit");
const modeSelect = document.getElementById("mode");
const hover = document.getElementById("hover");
document.getElementById("title").textContent = "rnngen inspect: " + D.model;
document.getElementById("summary").textContent = D.summary + " \u00b7 " + D.total_chars.toLocaleString() +
  " characters analysed, the first " + D.text.length.toLocaleString() + " shown";
document.getElementById("surprise").textContent = "mean surprise " + D.mean_surprise.toFixed(3) +
  " bits per token, mean prediction entropy " + D.mean_entropy.toFixed(3) + " bits.";

const decoded = {};
function values(name) {
  if (!decoded[name]) {
    const raw = atob(D.units[name].q);
    const out = new Float32Array(raw.length);
    for (let i = 0; i < raw.length; i++) { let b = raw.charCodeAt(i); if (b > 127) b -= 256; out[i] = b / 127; }
    decoded[name] = out;
  }
  return decoded[name];
}

const spans = [];
const frag = document.createDocumentFragment();
for (let i = 0; i < D.text.length; i++) {
  const s = document.createElement("span");
  const ch = D.text[i];
  s.textContent = ch === "\\n" ? "\u21b5\\n" : ch;
  s.dataset.i = i;
  spans.push(s);
  frag.appendChild(s);
}
textBox.appendChild(frag);

function colour(v) {  // v in [-1, 1]
  const a = Math.min(1, Math.abs(v));
  return v >= 0 ? `rgba(220,50,47,${a.toFixed(3)})` : `rgba(38,139,210,${a.toFixed(3)})`;
}
function paint() {
  const mode = modeSelect.value;
  let vals;
  if (mode === "unit") vals = values(unitSelect.value);
  else {
    const src = D[mode];
    const max = Math.max(...src) || 1;
    vals = src.map(x => x / max);
  }
  for (let i = 0; i < spans.length; i++) spans[i].style.background = colour(vals[i]);
  document.querySelectorAll("button.unit").forEach(b => b.classList.toggle("active", mode === "unit" && b.dataset.unit === unitSelect.value));
}

const ranked = new Set();
const tbody = document.querySelector("#features tbody");
for (const f of D.features) {
  const tr = document.createElement("tr");
  const name = document.createElement("td");
  name.innerHTML = "<b></b><br><span class='muted'></span>";
  name.querySelector("b").textContent = f.name;
  name.querySelector("span").textContent = f.help + (f.source !== "builtins" ? " (" + f.source + ")" : "");
  const cell = document.createElement("td");
  if (!f.present) cell.innerHTML = "<span class='muted'>constant in this text</span>";
  for (const [unit, r] of f.top) {
    ranked.add(unit);
    const b = document.createElement("button");
    b.className = "unit"; b.dataset.unit = unit;
    b.textContent = unit + " " + (r >= 0 ? "+" : "") + r.toFixed(2);
    b.onclick = () => { unitSelect.value = unit; modeSelect.value = "unit"; paint(); };
    cell.appendChild(b);
  }
  tr.append(name, cell);
  tbody.appendChild(tr);
}
const groups = [["best for a feature", [...ranked]], ["last layer h", Object.keys(D.units).filter(u => !ranked.has(u))]];
for (const [label, names] of groups) {
  if (!names.length) continue;
  const g = document.createElement("optgroup"); g.label = label;
  for (const n of names) { const o = document.createElement("option"); o.value = o.textContent = n; g.appendChild(o); }
  unitSelect.appendChild(g);
}
if (D.best.length) unitSelect.value = D.best[0][1];
if (location.hash.length > 1) unitSelect.value = decodeURIComponent(location.hash.slice(1));
unitSelect.onchange = () => { modeSelect.value = "unit"; paint(); };
modeSelect.onchange = paint;
textBox.addEventListener("mouseover", e => {
  const i = e.target.dataset && e.target.dataset.i;
  if (i === undefined) return;
  const u = unitSelect.value;
  const v = D.units[u].centre + values(u)[i] * D.units[u].scale;
  hover.textContent = `char ${i} ${JSON.stringify(D.text[i])} \u00b7 ${u} = ${v.toFixed(3)} \u00b7 surprise ${D.surprise[i]} bits \u00b7 entropy ${D.entropy[i]} bits`;
});
paint();
document.body.dataset.ready = "1";
</script>
</body></html>
"""
