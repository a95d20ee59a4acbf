// flowray route explorer, part 2: the view (canvas route, SVG labels, panels, compare mode) and the controls.
(function () {
  "use strict";
  const RAW = JSON.parse(document.getElementById("flowray-data").textContent);
  const VOCAB = RAW.vocab;

  const { decode, sub, level, nodeOf, extractRoute, serialise, routeHeads, headActivation } = FlowrayRoute;
  const PROMPTS = RAW.prompts.map(decode);
  const tok = (id) => (VOCAB[String(id)] === undefined ? "#" + id : VOCAB[String(id)]);
  const q = (s) => JSON.stringify(s); // quoted, whitespace visible
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  const pct = (p) => (100 * p).toFixed(p >= 0.1 ? 1 : 2) + "%";
  const fmt = (v) => (v === 0 ? "0" : v >= 0.01 ? v.toFixed(3) : v.toExponential(1));

  // 11 shades by importance (0, 0.1, ..., 1): light to dark blue for attention, orange for FFNs
  const mix = (c0, c1, t) => "#" + c0.map((v, i) => Math.round(v + (c1[i] - v) * t).toString(16).padStart(2, "0")).join("");
  const BLUES = Array.from({ length: 11 }, (_, i) => mix([160, 195, 230], [16, 64, 140], i / 10));
  const FFN_SHADES = Array.from({ length: 11 }, (_, i) => mix([253, 224, 196], [224, 110, 20], i / 10));

  // --- state --------------------------------------------------------------------------------------
  const state = { tau: RAW.tau, mode: RAW.mode, views: [] };
  const $ = (id) => document.getElementById(id);
  const tip = $("tip"), panel = $("panel");

  // One prompt's drawing. The route goes onto a <canvas> (thousands of edges redraw in a few ms; as SVG
  // elements they cost style, layout and paint per element); labels are a static SVG overlay, and hover/click
  // find the edge or node under the mouse from the geometry kept at the last draw.
  class View {
    constructor(index, promptIndex) {
      this.index = index;
      this.el = document.createElement("div");
      this.el.className = "view";
      $("views").appendChild(this.el);
      this.setPrompt(promptIndex);
    }
    setPrompt(pi) {
      this.pi = pi;
      this.P = PROMPTS[pi];
      this.pos = this.P.position;
      this.selected = null;
      this.el.innerHTML = '<div class="head"><select class="pos" aria-label="prediction position"></select>' +
        '<span class="stats"></span></div><div class="pred"></div><div class="text"></div>' +
        '<div class="svgwrap"><div class="stack"><canvas class="route"></canvas>' +
        '<svg xmlns="http://www.w3.org/2000/svg" class="labels"><g class="static"></g></svg></div></div>';
      const sel = this.el.querySelector("select.pos");
      sel.innerHTML = this.P.tokens.map((t, i) => `<option value="${i}">${i}: ${esc(q(t))}</option>`).join("");
      sel.value = String(this.pos);
      sel.addEventListener("change", () => this.setPosition(+sel.value));
      this.el.querySelector(".text").textContent = this.P.text;
      this.svg = this.el.querySelector("svg");
      this.canvas = this.el.querySelector("canvas");
      this.layout();
      this.drawStatic();
      this.canvas.addEventListener("mousemove", (ev) => this.hover(ev));
      this.canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
      this.canvas.addEventListener("click", (ev) => this.click(ev));
      this.svg.addEventListener("click", (ev) => { const p = ev.target.dataset.pos; if (p !== undefined) this.setPosition(+p); });
    }
    layout() {
      const P = this.P;
      const avail = Math.max(320, (state.mode === "compare" ? window.innerWidth / 2 : window.innerWidth) - 440);
      this.colW = Math.max(18, Math.min(60, (avail - 60) / P.T));
      this.rowH = P.parallel ? Math.max(14, Math.min(26, 640 / P.nLevels)) : Math.max(9, Math.min(18, 760 / P.nLevels));
      this.left = 50; this.top = 12;
      this.width = Math.ceil(this.left + P.T * this.colW + 12);
      this.height = Math.ceil(this.top + (P.nLevels - 1) * this.rowH + 100);
      const dpr = window.devicePixelRatio || 1;
      this.svg.setAttribute("width", this.width);
      this.svg.setAttribute("height", this.height);
      this.canvas.width = Math.round(this.width * dpr);
      this.canvas.height = Math.round(this.height * dpr);
      this.canvas.style.width = this.width + "px";
      this.canvas.style.height = this.height + "px";
      this.ctx = this.canvas.getContext("2d");
      this.ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      const stack = this.el.querySelector(".stack");
      stack.style.height = this.height + "px";
      stack.style.width = this.width + "px";
    }
    x(pos) { return this.left + (pos + 0.5) * this.colW; }
    y(lev) { return this.top + (this.P.nLevels - 1 - lev) * this.rowH; }
    drawStatic() {
      const P = this.P;
      let s = "";
      const step = Math.max(1, Math.ceil(P.L / 15));
      s += `<text class="lab" x="4" y="${this.y(0) + 3}">emb</text>`;
      for (let l = 0; l < P.L; l += step) s += `<text class="lab" x="4" y="${this.y(level(P, l, "block")) + 3}">L${l}</text>`;
      const yb = this.y(0) + 12;
      P.tokens.forEach((t, i) => {
        s += `<text class="tok" data-pos="${i}" text-anchor="end" transform="translate(${this.x(i) + 3},${yb}) rotate(-55)">${esc(q(t).slice(1, -1) || "\u2205")}</text>`;
      });
      this.el.querySelector("g.static").innerHTML = s;
    }
    setPosition(pos) {
      this.pos = pos;
      this.selected = null;
      this.el.querySelector("select.pos").value = String(pos);
      update();
    }
    compute() { this.route = extractRoute(this.P, state.tau, this.pos); this.heads = routeHeads(this.P, this.route); }
    render(other) {
      const P = this.P, r = this.route, ctx = this.ctx;
      this.only = other ? new Set([...this.heads].filter((h) => !other.heads.has(h))) : null;
      ctx.clearRect(0, 0, this.width, this.height);
      if (!P.parallel) { // a light band for every other block
        ctx.fillStyle = "#f6f6f6";
        for (let l = 1; l < P.L; l += 2) ctx.fillRect(this.left, this.y(2 * l + 2.5), P.T * this.colW, 2 * this.rowH);
      }
      ctx.strokeStyle = "#e6e6e6"; ctx.lineWidth = 1;
      ctx.beginPath();
      for (let p = 0; p < P.T; p++) { ctx.moveTo(this.x(p), this.y(0)); ctx.lineTo(this.x(p), this.y(P.nLevels - 1)); }
      ctx.stroke();
      // geometry of everything drawn, for hit-testing: segments [x1, y1, x2, y2, width, edge index]
      const segs = [], boxes = [], dots = [];
      let nHot = 0;
      // lines are batched into one path per (colour, width) bucket: a few dozen strokes, not one per edge;
      // buckets are painted weakest first, so strong edges lie on top
      const buckets = new Map();
      const sel = this.selected;
      r.edges.forEach((e, i) => {
        const a = nodeOf(P, e.src), b = nodeOf(P, e.tgt);
        const x1 = this.x(a.pos), y1 = this.y(a.lev), x2 = this.x(b.pos), y2 = this.y(b.lev);
        if (e.kind === "ffn") {
          const z = 4 + 7 * e.imp;
          boxes.push([x2 + this.colW * 0.2 - z / 2, (y1 + y2) / 2 - z / 2, z, i]);
          return;
        }
        const shade = Math.round(10 * e.imp);
        const w = Math.round(4 * (e.kind === "residual" ? 0.8 + 3 * e.imp : 0.8 + 6 * e.imp)) / 4;
        const hot = e.heads && this.only && e.heads.some((hv) => this.only.has(b.layer * P.H + hv[0]));
        nHot += hot ? 1 : 0;
        const color = sel && sel.edge === i ? "#d6336c" : e.kind === "residual" ? "#8c8c8c" : hot ? "#e8590c" : BLUES[shade];
        const rank = (sel && sel.edge === i ? 3 : hot ? 2 : e.kind === "residual" ? 0 : 1) * 1000 + w * 10; // paint order
        const key = color + " " + w;
        let bk = buckets.get(key);
        if (!bk) buckets.set(key, (bk = { color, w, rank, xy: [] }));
        bk.xy.push(x1, y1, x2, y2);
        segs.push([x1, y1, x2, y2, w, i]);
      });
      for (const bk of [...buckets.values()].sort((a, b) => a.rank - b.rank)) {
        ctx.strokeStyle = bk.color; ctx.lineWidth = bk.w;
        ctx.beginPath();
        for (let n = 0; n < bk.xy.length; n += 4) { ctx.moveTo(bk.xy[n], bk.xy[n + 1]); ctx.lineTo(bk.xy[n + 2], bk.xy[n + 3]); }
        ctx.stroke();
      }
      // like the PNG figure: the widest cross-token attention edges name their strongest heads
      ctx.font = "10px system-ui, sans-serif"; ctx.fillStyle = "#08306b"; ctx.textAlign = "right";
      const strong = r.edges.filter((e) => e.kind === "attention" && e.imp >= 0.15 && e.src % P.T !== e.tgt % P.T);
      for (const e of strong.sort((a, b) => b.imp - a.imp).slice(0, 40)) {
        const b = nodeOf(P, e.tgt);
        ctx.fillText(`L${b.layer}H${e.heads.slice(0, 3).map((h) => h[0]).join(",")}`, this.x(b.pos) - 5, this.y(b.lev) + 11);
      }
      ctx.strokeStyle = "#8a4b08"; ctx.lineWidth = 0.6;
      for (const [bx, by, z, i] of boxes) {
        ctx.fillStyle = sel && sel.edge === i ? "#d6336c" : FFN_SHADES[Math.round(10 * r.edges[i].imp)];
        ctx.fillRect(bx, by, z, z); ctx.strokeRect(bx, by, z, z);
      }
      const topKey = level(P, P.L - 1, "block") * P.T + this.pos;
      ctx.fillStyle = "#333";
      ctx.beginPath();
      const rad = Math.min(2.8, this.rowH / 4);
      for (const key of r.nodes) {
        const n = nodeOf(P, key), cx = this.x(n.pos), cy = this.y(n.lev);
        dots.push([cx, cy, key]);
        if (key === topKey || (sel && sel.node === key)) continue;
        ctx.moveTo(cx + rad, cy); ctx.arc(cx, cy, rad, 0, 2 * Math.PI);
      }
      ctx.fill();
      for (const [key, color, rad] of [[topKey, "#0b5394", 4.5], [sel && sel.node, "#d6336c", 3.6]]) {
        if (key == null || !r.nodes.has(key)) continue;
        const n = nodeOf(P, key);
        ctx.fillStyle = color; ctx.beginPath(); ctx.arc(this.x(n.pos), this.y(n.lev), rad, 0, 2 * Math.PI); ctx.fill();
      }
      this.hit = { segs, boxes, dots };
      this.drawnCount = { nodes: dots.length, edges: segs.length + boxes.length, only: nHot };
      this.svg.querySelectorAll("text.tok").forEach((t) => {
        const p = +t.dataset.pos;
        t.setAttribute("class", "tok" + (p === this.pos ? " sel" : p > this.pos ? " later" : ""));
      });
      const k = P.k, bk = this.pos * k;
      const alts = [];
      for (let i = 1; i < k; i++) alts.push(`${esc(q(tok(P.topIds[bk + i])))} ${pct(P.topProbs[bk + i])}`);
      this.el.querySelector(".pred").innerHTML = `position ${this.pos} ${esc(q(P.tokens[this.pos]))} predicts ` +
        `<b>${esc(q(tok(P.topIds[bk])))}</b> (${pct(P.topProbs[bk])}) <span class="alt">· then ${alts.join(", ")}</span>`;
      this.el.querySelector(".stats").textContent = `${r.nodes.size} nodes, ${r.edges.length} edges, ${this.heads.size} heads at tau = ${state.tau}`;
    }
    // what is under canvas point (px, py): a node (within 5 px), an FFN square, else the nearest edge line
    pick(px, py) {
      const { segs, boxes, dots } = this.hit;
      let best = null, bd = 25;
      for (const [cx, cy, key] of dots) { const d = (cx - px) ** 2 + (cy - py) ** 2; if (d <= bd) { bd = d; best = { node: key }; } }
      if (best) return best;
      for (let n = boxes.length - 1; n >= 0; n--) {
        const [bx, by, z, i] = boxes[n];
        if (px >= bx - 1 && px <= bx + z + 1 && py >= by - 1 && py <= by + z + 1) return { edge: this.route.edges[i], index: i };
      }
      let dmin = Infinity;
      for (let n = segs.length - 1; n >= 0; n--) { // drawn last = on top
        const [x1, y1, x2, y2, w, i] = segs[n];
        const dx = x2 - x1, dy = y2 - y1, len = dx * dx + dy * dy;
        const t = len ? Math.max(0, Math.min(1, ((px - x1) * dx + (py - y1) * dy) / len)) : 0;
        const d = Math.hypot(px - x1 - t * dx, py - y1 - t * dy) - w / 2;
        if (d < dmin - 0.5) { dmin = d; best = { edge: this.route.edges[i], index: i }; }
      }
      return dmin <= 3 ? best : null;
    }
    point(ev) { const b = this.canvas.getBoundingClientRect(); return [ev.clientX - b.left, ev.clientY - b.top]; }
    hover(ev) {
      const hit = this.pick(...this.point(ev));
      this.canvas.style.cursor = hit ? "pointer" : "default";
      if (!hit) { tip.hidden = true; return; }
      let text;
      if (hit.edge) text = edgeLabel(this.P, hit.edge) + (hit.edge.heads ? "; heads " + hit.edge.heads.slice(0, 4).map(([h, v]) => `H${h} ${fmt(v)}`).join(", ") : "");
      else text = nodeLabel(this.P, hit.node) + " (click: parts, logit lens)";
      tip.textContent = text;
      tip.hidden = false;
      tip.style.left = ev.clientX + 12 + "px";
      tip.style.top = ev.clientY + 12 + "px";
    }
    click(ev) {
      const hit = this.pick(...this.point(ev));
      if (!hit) return;
      if (hit.edge) { this.select({ edge: hit.index }); edgePanel(this, hit.edge); } else { this.select({ node: hit.node }); nodePanel(this, hit.node); }
    }
    select(what) { this.selected = what; this.render(state.mode === "compare" ? state.views[1 - this.index] : null); }
    // page coordinates of a node or an edge's middle (for tests and scripted clicks)
    where(what) {
      const b = this.canvas.getBoundingClientRect();
      if (what.node !== undefined) { const n = nodeOf(this.P, what.node); return [b.left + this.x(n.pos), b.top + this.y(n.lev)]; }
      const s = this.hit.segs.find((g) => g[5] === what.edge);
      return [b.left + (s[0] + s[2]) / 2, b.top + (s[1] + s[3]) / 2];
    }
  }

  function nodeLabel(P, key) {
    const n = nodeOf(P, key);
    const what = n.kind === "embed" ? "embedding" : n.kind === "attn" ? `L${n.layer} after attention` : `L${n.layer} block output`;
    return `${what} @ ${n.pos} ${q(P.tokens[n.pos])}`;
  }
  function edgeLabel(P, e) {
    const a = nodeOf(P, e.src), b = nodeOf(P, e.tgt);
    return `${e.kind} edge ${a.pos}\u2192${b.pos} into L${b.layer} (${b.kind}), importance ${fmt(e.imp)}`;
  }

  // --- panels -------------------------------------------------------------------------------------
  function openPanel(html) {
    panel.innerHTML = '<span class="close" title="close">\u2715</span>' + html;
    panel.hidden = false;
    document.body.classList.add("with-panel");
  }
  panel.addEventListener("click", (ev) => {
    const t = ev.target;
    if (t.classList.contains("close")) { panel.hidden = true; document.body.classList.remove("with-panel"); return; }
    if (t.dataset.head) { const [v, l, h] = t.dataset.head.split(",").map(Number); headPanel(state.views[v], l, h); }
  });
  const headLink = (view, l, h) => `<span class="headlink" data-head="${view.index},${l},${h}">L${l}H${h}</span>`;

  function nodeParts(view, key) { // [[label, value, survives, headLayer|null, head|null]]
    const P = view.P, n = nodeOf(P, key), tau = state.tau, tauF = Math.fround(tau), T = P.T, l = n.layer, pos = n.pos;
    if (n.kind === "embed") return [];
    if (n.kind === "block" && !P.parallel) {
      return [["FFN", P.ffn[l * T + pos], P.ffn[l * T + pos] > tau], ["residual", P.fr[l * T + pos], P.fr[l * T + pos] > tau]];
    }
    const parts = [["residual", P.ar[l * T + pos], P.ar[l * T + pos] > tau]];
    if (P.parallel) parts.push(["FFN", P.ffn[l * T + pos], P.ffn[l * T + pos] > tau]);
    for (let h = 0; h < P.H; h++) {
      let s = 0, kept = false;
      for (let j = 0; j <= pos; j++) { const v = sub(P, l, h, pos, j); s += v; kept = kept || v > tauF; }
      parts.push([null, s, kept, l, h]);
    }
    return parts.sort((a, b) => b[1] - a[1]);
  }

  function nodePanel(view, key) {
    const P = view.P, n = nodeOf(P, key);
    let html = `<h2>${esc(nodeLabel(P, key))}</h2>`;
    const parts = nodeParts(view, key);
    if (parts.length) {
      html += "<h3>parts (importance; grey: at most tau, dropped)</h3><table class='parts'>";
      for (const [label, v, kept, l, h] of parts.slice(0, 12)) {
        html += `<tr class="${kept ? "" : "drop"}"><td>${label === null ? headLink(view, l, h) + " (all sources)" : label}</td><td class="num">${fmt(v)}</td></tr>`;
      }
      html += "</table>";
    }
    const into = view.route.edges.filter((e) => e.tgt === key);
    if (into.length) {
      html += "<h3>route edges into this node (renormalised)</h3><table>";
      for (const e of into.sort((a, b) => b.imp - a.imp).slice(0, 12)) {
        const a = nodeOf(P, e.src);
        html += `<tr><td>${e.kind} from ${a.pos} ${esc(q(P.tokens[a.pos]))}</td><td class="num">${fmt(e.imp)}</td></tr>`;
      }
      html += "</table>";
    }
    html += "<h3>logit lens: this residual through the final norm and unembedding</h3><table class='lens'>";
    const b = (n.lev * P.T + n.pos) * P.k;
    for (let i = 0; i < P.k; i++) {
      html += `<tr><td>${i + 1}</td><td class="lens-token">${esc(q(tok(P.lensIds[b + i])))}</td><td class="num">${pct(P.lensProbs[b + i])}</td></tr>`;
    }
    openPanel(html + "</table>");
  }

  function edgePanel(view, e) {
    const P = view.P, b = nodeOf(P, e.tgt), a = nodeOf(P, e.src);
    let html = `<h2>${esc(e.kind)} edge</h2><p>from ${esc(nodeLabel(P, e.src))}<br>to ${esc(nodeLabel(P, e.tgt))}<br>` +
      `importance ${fmt(e.imp)} (renormalised among the surviving parts of its upper node)</p>`;
    if (e.heads) {
      html += "<h3>heads (sub-edge importance)</h3><table class='heads'>";
      for (const [h, v] of e.heads) html += `<tr><td>${headLink(view, b.layer, h)}</td><td class="num">${fmt(v)}</td><td class="num">raw ${fmt(sub(P, b.layer, h, b.pos, a.pos))}</td></tr>`;
      html += "</table>";
    }
    openPanel(html);
  }

  function headPanel(view, l, h) {
    const P = view.P, T = P.T;
    const cell = Math.max(3, Math.min(14, Math.floor(300 / T)));
    let max = 0;
    for (let p = 0; p < T; p++) for (let j = 0; j <= p; j++) max = Math.max(max, sub(P, l, h, p, j));
    openPanel(`<h2>head L${l}H${h}: importance map [pos, j]</h2><p>row: prediction position (top = 0), column: source ` +
      `token j; darker = more important (max ${fmt(max)}). The outlined row is position ${view.pos}.</p>` +
      `<canvas id="headmap" width="${T * cell}" height="${T * cell}"></canvas><p id="headval">&nbsp;</p>`);
    const cv = $("headmap"), ctx = cv.getContext("2d");
    for (let p = 0; p < T; p++) for (let j = 0; j <= p; j++) {
      const v = max > 0 ? sub(P, l, h, p, j) / max : 0;
      ctx.fillStyle = `rgb(${Math.round(255 - 222 * v)},${Math.round(255 - 160 * v)},${Math.round(255 - 80 * v)})`;
      ctx.fillRect(j * cell, p * cell, cell, cell);
    }
    ctx.strokeStyle = "#d6336c";
    ctx.strokeRect(0.5, view.pos * cell + 0.5, (view.pos + 1) * cell - 1, cell - 1);
    cv.addEventListener("mousemove", (ev) => {
      const r = cv.getBoundingClientRect(), p = Math.floor((ev.clientY - r.top) / cell), j = Math.floor((ev.clientX - r.left) / cell);
      if (p < 0 || p >= T || j < 0 || j > p) return;
      $("headval").textContent = `pos ${p} ${q(P.tokens[p])}, j ${j} ${q(P.tokens[j])}: ${fmt(sub(P, l, h, p, j))}`;
    });
  }

  // --- compare: difference of head activations ----------------------------------------------------
  function renderDiff() {
    const box = $("diff");
    if (state.mode !== "compare") { box.hidden = true; return; }
    const [A, B] = state.views;
    if (A.P.L !== B.P.L || A.P.H !== B.P.H) { box.hidden = false; box.textContent = "the two prompts come from models of different shapes"; return; }
    const a = headActivation(A.P, A.pos), b = headActivation(B.P, B.pos), L = A.P.L, H = A.P.H;
    let m = 1e-12;
    const d = a.map((v, i) => { const x = v - b[i]; m = Math.max(m, Math.abs(x)); return x; });
    let html = `<h3>Head activation, A \u2212 B (sum over sources of each head's importance at the chosen positions): ` +
      `red = more in A, blue = more in B; a letter marks a head in only that prompt's route at tau = ${state.tau}</h3><table><tr><th></th>`;
    for (let h = 0; h < H; h++) html += `<th>H${h}</th>`;
    html += "</tr>";
    for (let l = L - 1; l >= 0; l--) {
      html += `<tr><th>L${l}</th>`;
      for (let h = 0; h < H; h++) {
        const x = d[l * H + h], s = Math.abs(x) / m, key = l * H + h;
        const c = x >= 0 ? `rgba(214,51,51,${s.toFixed(3)})` : `rgba(38,99,196,${s.toFixed(3)})`;
        const mark = A.heads.has(key) && !B.heads.has(key) ? "A" : B.heads.has(key) && !A.heads.has(key) ? "B" : "";
        html += `<td style="background:${c}" data-head="0,${l},${h}" title="L${l}H${h}: A ${fmt(a[l * H + h])}, B ${fmt(b[l * H + h])}">${mark}</td>`;
      }
      html += "</tr>";
    }
    const order = Array.from(d.keys()).sort((i, j) => Math.abs(d[j]) - Math.abs(d[i])).slice(0, 8);
    html += "</table><p class='top'>largest differences: " + order.map((i) => `L${Math.floor(i / H)}H${i % H} ${d[i] >= 0 ? "+" : ""}${d[i].toFixed(3)}`).join(", ") + "</p>";
    box.innerHTML = html;
    box.hidden = false;
  }
  $("diff").addEventListener("click", (ev) => {
    const t = ev.target.closest("td[data-head]");
    if (t) { const [v, l, h] = t.dataset.head.split(",").map(Number); headPanel(state.views[v], l, h); }
  });

  // --- controls -----------------------------------------------------------------------------------
  function update() {
    for (const v of state.views) v.compute();
    const [A, B] = state.views;
    if (state.mode === "compare") { A.render(B); B.render(A); } else A.render(null);
    renderDiff();
  }
  function setTau(t) {
    if (!(t > 0 && t < 1)) return;
    state.tau = t;
    $("tau").value = String(t);
    $("tau-num").value = String(t);
    update();
  }
  $("tau").addEventListener("input", (ev) => setTau(+ev.target.value));
  $("tau-num").addEventListener("change", (ev) => setTau(+ev.target.value));

  if (state.mode === "compare") {
    $("only-legend").hidden = false;
    state.views = [new View(0, 0), new View(1, 1)];
    state.views[0].el.querySelector(".head").insertAdjacentHTML("afterbegin", "<b>A</b>");
    state.views[1].el.querySelector(".head").insertAdjacentHTML("afterbegin", "<b>B</b>");
  } else {
    state.views = [new View(0, 0)];
    if (PROMPTS.length > 1) {
      const sel = $("prompt");
      sel.innerHTML = PROMPTS.map((p, i) => `<option value="${i}">${i}: ${esc(p.text.slice(0, 60))}</option>`).join("");
      sel.addEventListener("change", () => { state.views[0].setPrompt(+sel.value); update(); });
      $("prompt-pick").hidden = false;
    }
  }
  setTau(state.tau);

  // --- the page's API (used by the tests; handy from the console) -------------------------------------
  window.flowray = {
    prompts: PROMPTS, vocab: VOCAB, state,
    extractRoute: (pi, tau, pos) => serialise(PROMPTS[pi], extractRoute(PROMPTS[pi], tau, pos)),
    route: (v = 0) => serialise(state.views[v].P, state.views[v].route),
    setTau,
    setPosition: (v, pos) => state.views[v].setPosition(pos),
    setPrompt: (pi) => { state.views[0].setPrompt(pi); $("prompt").value = String(pi); update(); },
    drawn: (v = 0) => state.views[v].drawnCount, // primitives painted at the last draw
    where: (v, what) => state.views[v].where(what),
    nodeKey: (v, layer, pos, kind) => level(state.views[v].P, layer, kind) * state.views[v].P.T + pos,
    openNode: (v, layer, pos, kind) => nodePanel(state.views[v], level(state.views[v].P, layer, kind) * state.views[v].P.T + pos),
  };
})();
