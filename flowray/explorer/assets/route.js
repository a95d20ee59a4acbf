// flowray route explorer, part 1: the page's data and flowray.routes.extract_route re-implemented, line for
// line, so the browser re-prunes a route at any tau without Python. No DOM here.
const FlowrayRoute = (function () {
  "use strict";
  // --- data ---------------------------------------------------------------------------------------
  function bytes(s) {
    const bin = atob(s);
    const u = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
    return u.buffer;
  }
  const f32 = (s) => (s == null ? null : new Float32Array(bytes(s)));
  const i32 = (s) => new Int32Array(bytes(s));

  function decode(p) {
    const L = p.n_layers, H = p.n_heads, T = p.n_tokens;
    return {
      text: p.text, model: p.model, L, H, T, parallel: p.parallel, tokens: p.tokens, tokenIds: p.token_ids,
      k: p.top_k, position: p.position, NT: (T * (T + 1)) / 2, nLevels: p.parallel ? L + 1 : 2 * L + 1,
      attn: f32(p.attn), ar: f32(p.attn_residual), ffn: f32(p.ffn), fr: f32(p.ffn_residual),
      lensIds: i32(p.lens_ids), lensProbs: f32(p.lens_probs), topIds: i32(p.top_ids), topProbs: f32(p.top_probs),
    };
  }
  // attn[l, h, pos, j] from the packed lower triangle
  const sub = (P, l, h, pos, j) => P.attn[(l * P.H + h) * P.NT + (pos * (pos + 1)) / 2 + j];

  // --- nodes: key = level * T + pos; levels as flowray.plots (embed 0; attn 2l+1, block 2l+2; parallel l+1)
  function level(P, layer, kind) {
    if (kind === "embed") return 0;
    if (P.parallel) return layer + 1;
    return 2 * layer + (kind === "attn" ? 1 : 2);
  }
  function nodeOf(P, key) {
    const lev = Math.floor(key / P.T), pos = key % P.T;
    if (lev === 0) return { layer: 0, pos, kind: "embed", lev };
    if (P.parallel) return { layer: lev - 1, pos, kind: "block", lev };
    return lev % 2 ? { layer: (lev - 1) / 2, pos, kind: "attn", lev } : { layer: (lev - 2) / 2, pos, kind: "block", lev };
  }

  // --- extract_route, line for line (flowray/routes.py) ---------------------------------------------
  // numpy compares the float32 sub-edge array with tau in float32 (Math.fround), while the direct parts
  // become Python floats first and compare in float64: both are kept here so the routes agree exactly.
  function extractRoute(P, tau, pos0) {
    const { L, H, T } = P;
    const tauF = Math.fround(tau);
    const nodes = new Set([level(P, L - 1, "block") * T + pos0]);
    const edges = [];
    let current = [pos0];
    for (let l = L - 1; l >= 0; l--) {
      const below = new Uint8Array(T);
      const inLev = l === 0 ? 0 : level(P, l - 1, "block");
      for (const pos of current) {
        const top = level(P, l, "block") * T + pos;
        let target, direct;
        if (P.parallel) {
          target = top;
          direct = [["residual", P.ar[l * T + pos]], ["ffn", P.ffn[l * T + pos]]];
        } else {
          const mid = level(P, l, "attn") * T + pos;
          const kept = [["ffn", P.ffn[l * T + pos]], ["residual", P.fr[l * T + pos]]].filter((p) => p[1] > tau);
          const total = kept.reduce((s, p) => s + p[1], 0);
          for (const [kind, v] of kept) edges.push({ src: mid, tgt: top, kind, imp: v / total, heads: null });
          if (!kept.length) continue;
          nodes.add(mid);
          target = mid;
          direct = [["residual", P.ar[l * T + pos]]];
        }
        const cols = new Array(pos + 1); // per source j: [[h, v], ...] of surviving sub-edges
        let total = 0;
        const base = l * H * P.NT + (pos * (pos + 1)) / 2;
        for (let h = 0; h < H; h++) {
          const row = base + h * P.NT;
          for (let j = 0; j <= pos; j++) {
            const v = P.attn[row + j];
            if (v > tauF) { (cols[j] || (cols[j] = [])).push([h, v]); total += v; }
          }
        }
        const keptDirect = direct.filter((p) => p[1] > tau);
        for (const p of keptDirect) total += p[1];
        if (total <= 0) continue;
        const src0 = inLev * T;
        for (const [kind, v] of keptDirect) {
          edges.push({ src: src0 + pos, tgt: target, kind, imp: v / total, heads: null });
          nodes.add(src0 + pos);
          below[pos] = 1;
        }
        for (let j = 0; j <= pos; j++) {
          const col = cols[j];
          if (!col) continue;
          let s = 0;
          for (const c of col) s += c[1];
          col.sort((a, b) => b[1] - a[1]); // stable: ties keep head order, as Python's sorted()
          for (const c of col) c[1] /= total; // in place: the pairs become the edge's heads
          edges.push({ src: src0 + j, tgt: target, kind: "attention", imp: s / total, heads: col });
          nodes.add(src0 + j);
          below[j] = 1;
        }
      }
      current = [];
      for (let p = 0; p < T; p++) if (below[p]) current.push(p);
    }
    return { nodes, edges, tau, position: pos0 };
  }

  function serialise(P, r) {
    const nd = (key) => { const n = nodeOf(P, key); return [n.layer, n.pos, n.kind]; };
    return {
      position: r.position, tau: r.tau,
      nodes: Array.from(r.nodes, nd),
      edges: r.edges.map((e) => ({ source: nd(e.src), target: nd(e.tgt), kind: e.kind, importance: e.imp, heads: e.heads || [] })),
    };
  }
  function routeHeads(P, r) { // l * H + h of every head with a sub-edge in the route
    const out = new Set();
    for (const e of r.edges) {
      if (!e.heads) continue;
      const base = nodeOf(P, e.tgt).layer * P.H;
      for (const hv of e.heads) out.add(base + hv[0]);
    }
    return out;
  }
  function headActivation(P, pos) { // [L*H]: sum_j attn[l, h, pos, j] (EdgeImportances.head_importance)
    const out = new Float64Array(P.L * P.H);
    for (let l = 0; l < P.L; l++) for (let h = 0; h < P.H; h++) {
      let s = 0;
      for (let j = 0; j <= pos; j++) s += sub(P, l, h, pos, j);
      out[l * P.H + h] = s;
    }
    return out;
  }

  return { decode, sub, level, nodeOf, extractRoute, serialise, routeHeads, headActivation };
})();
