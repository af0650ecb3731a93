// logra-search browsing page. Plain JS, no build step, no external resources.
// Safety rule: text from the index (documents, ids, metadata) is only ever put into the page through
// textContent / attribute setters, never as markup, so a document holding <script> stays text.
"use strict";

const $ = (id) => document.getElementById(id);
const SNIPPET_CHARS = 280;
const QUERY_KEYS = ["prompt", "response", "k", "mode", "precision", "direction"];

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function fmt(x) {
  if (x === null || x === undefined || !Number.isFinite(x)) return String(x);
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 1e4 || a < 1e-3 ? x.toExponential(3) : x.toPrecision(4);
}

// ---- query <-> URL -------------------------------------------------------------------------

function queryFromURL() {
  const p = new URLSearchParams(location.search);
  const k = parseInt(p.get("k") || "10", 10);
  return {
    prompt: p.get("prompt") || "",
    response: p.get("response") || "",
    k: Number.isFinite(k) ? k : 10,
    mode: p.get("mode") === "influence" ? "influence" : "cosine",
    precision: p.get("precision") === "fast" ? "fast" : "high",
    direction: p.get("direction") === "opponents" ? "opponents" : "proponents",
    tok: p.get("tok") || "",  // the document whose token view is open
    id: p.get("id") || "",    // the document page's document
  };
}

function queryParams(q, extra = {}) {
  const p = new URLSearchParams();
  if (q.prompt) p.set("prompt", q.prompt);
  p.set("response", q.response);
  p.set("k", String(q.k));
  p.set("mode", q.mode);
  if (q.precision === "fast") p.set("precision", q.precision);
  if (q.direction === "opponents") p.set("direction", q.direction);
  for (const [k, v] of Object.entries(extra)) if (v) p.set(k, v);
  return p;
}

function searchURL(q, extra = {}) { return "/?" + queryParams(q, extra).toString(); }
function documentURL(id, q) {
  const p = q && q.response ? queryParams(q) : new URLSearchParams();
  p.set("id", id);
  return "/ui/document?" + p.toString();
}

function formQuery() {
  return { prompt: $("prompt").value, response: $("response").value, k: parseInt($("k").value, 10), mode: $("mode").value,
           precision: $("precision").value, direction: $("direction").value };
}

function fillForm(q) {
  $("prompt").value = q.prompt;
  $("response").value = q.response;
  $("k").value = String(q.k);
  $("mode").value = q.mode;
  $("precision").value = q.precision;
  $("direction").value = q.direction;
}

// ---- HTTP ----------------------------------------------------------------------------------

function describeError(status, body) {
  const d = body && body.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) {
    return d.map((e) => {
      const where = Array.isArray(e.loc) ? e.loc.filter((x) => x !== "body").join(".") : "";
      return (where ? where + ": " : "") + String(e.msg || JSON.stringify(e)).replace(/^Value error, /, "");
    }).join("; ");
  }
  return `the server answered ${status}`;
}

const KEY_STORE = "logra-search-api-key";  // this tab only: sessionStorage

async function api(method, path, body, askedForKey = false) {
  let r;
  const headers = body === undefined ? {} : { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers["Authorization"] = "Bearer " + key;
  try {
    r = await fetch(path, body === undefined ? { method, headers } : { method, headers, body: JSON.stringify(body) });
  } catch (e) {
    throw new Error("could not reach the server (" + e.message + ")");
  }
  if (r.status === 401 && !askedForKey) {  // the server has an API key: ask once, keep it for this tab
    const given = window.prompt("This server needs an API key:");
    if (given) {
      sessionStorage.setItem(KEY_STORE, given.trim());
      return api(method, path, body, true);
    }
  }
  let data = null;
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) {
    const err = new Error(describeError(r.status, data));
    err.status = r.status;
    throw err;
  }
  return data;
}

function setStatus(node, kind, text) {
  node.className = "status" + (kind ? " " + kind : "");
  node.textContent = text || "";
}

// ---- index header --------------------------------------------------------------------------

async function loadIndexInfo() {
  const node = $("index-info");
  try {
    const m = await api("GET", "/index");
    node.textContent = "";
    const pre = m.preconditioner || {};
    const parts = [
      ["model", m.model && m.model.name_or_path],
      ["documents", m.n_documents],
      ["preconditioner", pre.kind + (pre.damping_ratio !== undefined && pre.kind !== "none" ? ` (damping ${pre.damping_ratio})` : "")],
      ["rank", m.rank],
      ["dim", m.dim],
      ["high-fidelity", m.high ? `${m.high.preconditioner.kind}, dim ${m.high.dim}` : undefined],
      ["layers", Array.isArray(m.layers) ? m.layers.length : undefined],
    ];
    parts.forEach(([label, value], i) => {
      if (value === undefined || value === null) return;
      if (i) node.append(" · ");
      node.append(label + " ", el("b", { text: String(value), dataset: { field: label } }));
    });
    if (m.model && m.model.name_or_path) node.title = m.model.name_or_path;
  } catch (e) {
    node.classList.add("error");
    node.textContent = "index unavailable: " + e.message;
  }
}

// ---- token view ----------------------------------------------------------------------------

async function renderTokenView(container, q, id) {
  container.hidden = false;
  container.textContent = "";
  const status = el("div", { class: "status loading", text: "Scoring each response token…" });
  container.append(status);
  let t;
  try {
    t = await api("POST", "/attribute/tokens", { prompt: q.prompt, response: q.response, id, mode: q.mode,
                                                       precision: q.precision });
  } catch (e) {
    setStatus(status, "error", "Token view failed: " + e.message);
    return;
  }
  status.remove();
  const scored = t.tokens.filter((x) => x.score !== null).map((x) => Math.abs(x.score));
  const top = Math.max(0, ...scored) || 1;
  const legend = el("div", { class: "legend" },
    `${q.mode} score `, el("b", { text: fmt(t.document_score) }),
    ` · sum over ${t.n_scored_tokens} scored tokens `, el("b", { text: fmt(t.total) }),
    el("span", { class: "swatch pos" }), "raises the score",
    el("span", { class: "swatch neg" }), "lowers it");
  if (t.truncated) legend.append(` · only the first ${t.max_tokens_scored} tokens (of a possibly truncated query) are scored`);
  const tokens = el("div", { class: "tokens", "data-doc": id });
  for (const tok of t.tokens) {
    const span = el("span", { class: "tok", text: tok.text });
    if (tok.score === null) {
      span.classList.add("unscored");
      span.title = "not scored (nothing predicts the first token, or past the cap)";
    } else {
      const a = Math.min(1, Math.abs(tok.score) / top);
      span.dataset.score = String(tok.score);
      span.dataset.intensity = a.toFixed(4);
      span.style.backgroundColor = `rgba(${tok.score >= 0 ? "22, 140, 74" : "205, 45, 45"}, ${(0.08 + 0.72 * a).toFixed(3)})`;
      span.title = `${JSON.stringify(tok.text)}: ${tok.score >= 0 ? "+" : ""}${fmt(tok.score)}`;
    }
    tokens.append(span);
  }
  container.append(legend, tokens);
}

// ---- results -------------------------------------------------------------------------------

function provenance(res) {
  const box = el("div", { class: "prov" });
  if (res.source) {
    const file = res.source.split("/").pop();
    box.append(el("span", { class: "chip", title: "the record's data file and line: " + res.source, dataset: { field: "record" } },
      el("span", { class: "k", text: "record" }), file + (res.line ? ":" + res.line : "")));
  }
  for (const [k, v] of Object.entries(res.metadata || {})) {
    const value = typeof v === "string" ? v : JSON.stringify(v);
    box.append(el("span", { class: "chip", title: `${k}: ${value}`, dataset: { field: k } }, el("span", { class: "k", text: k }), value));
  }
  return box;
}

function groupDuplicates(results) {
  const groups = new Map();
  for (const r of results) {
    const key = (r.prompt || "") + "\u0000" + r.text;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(r);
  }
  return [...groups.values()];  // insertion order = rank of each group's best member
}

function renderResult(group, q, top, openTok) {
  const res = group[0];
  const li = el("li", { class: "result", id: "r-" + res.rank, dataset: { id: res.id, rank: String(res.rank) } });
  const pct = Math.min(100, (Math.abs(res.score) / top) * 100);
  const bar = el("span", { class: "bar" + (res.score < 0 ? " negative" : ""), title: `${fmt(res.score)} (${pct.toFixed(0)}% of the top score)` },
    el("span", { class: "fill" }));
  bar.firstChild.style.width = pct.toFixed(2) + "%";
  bar.dataset.pct = pct.toFixed(2);
  const head = el("div", { class: "head" },
    el("span", { class: "rank", text: "#" + res.rank }),
    el("span", { class: "score", text: fmt(res.score), title: String(res.score) }),
    bar,
    el("a", { class: "doc-link", href: documentURL(res.id, q), text: res.id }));
  if (group.length > 1) head.append(el("span", { class: "dup", text: `×${group.length} identical texts` }));
  li.append(head, provenance(res));

  const body = el("div", { class: "body" });
  // prompt/response and chat documents: the context (not scored) apart from the response
  const prompt = res.prompt && res.text.startsWith(res.prompt) ? res.prompt : "";
  const response = res.text.slice(prompt.length);
  if (prompt) {
    const tail = prompt.length > SNIPPET_CHARS ? "…" + prompt.slice(-SNIPPET_CHARS) : prompt;
    body.append(el("div", { class: "prompt-snippet" }, el("span", { class: "k", text: "prompt" }), el("span", { text: tail })));
  }
  const long = response.length > SNIPPET_CHARS;
  const snippet = el("div", { class: "snippet", text: long ? response.slice(0, SNIPPET_CHARS) + "…" : response });
  body.append(snippet);
  if (group.length > 1) {
    const dups = el("div", { class: "dups" }, "same text also as: ");
    for (const d of group.slice(1)) dups.append(el("a", { href: documentURL(d.id, q), text: `#${d.rank} ${d.id} (${fmt(d.score)})` }));
    body.append(dups);
  }
  const actions = el("div", { class: "actions" });
  if (long) {
    const expand = el("button", { type: "button", class: "expand", "aria-expanded": "false", text: "Show full text" });
    expand.addEventListener("click", () => {
      const open = expand.getAttribute("aria-expanded") !== "true";
      snippet.textContent = open ? response : response.slice(0, SNIPPET_CHARS) + "…";
      expand.setAttribute("aria-expanded", String(open));
      expand.textContent = open ? "Show less" : "Show full text";
    });
    actions.append(expand);
  }
  const tokBtn = el("button", { type: "button", class: "tokens-btn", "aria-pressed": "false", text: "Token view",
                                title: "how much each response token contributes to this document's score" });
  const view = el("div", { class: "token-view", hidden: "" });
  tokBtn.addEventListener("click", () => {
    const open = tokBtn.getAttribute("aria-pressed") !== "true";
    setTokenView(li, open, q);
    history.replaceState(null, "", searchURL(q, open ? { tok: res.id } : {}));
  });
  actions.append(tokBtn);
  body.append(actions, view);
  li.append(body);
  if (openTok && openTok === res.id) setTokenView(li, true, q);
  return li;
}

function setTokenView(li, open, q) {
  for (const other of document.querySelectorAll(".result")) {  // one token view at a time
    const btn = other.querySelector(".tokens-btn"), view = other.querySelector(".token-view");
    const on = open && other === li;
    btn.setAttribute("aria-pressed", String(on));
    if (!on) { view.hidden = true; view.textContent = ""; }
  }
  if (open) renderTokenView(li.querySelector(".token-view"), q, li.dataset.id);
}

let searchSeq = 0;

async function runSearch(q) {
  const seq = ++searchSeq;
  const status = $("status"), list = $("results");
  list.textContent = "";
  setStatus(status, "loading", "Attributing: one forward and backward pass, then a vector search…");
  $("submit").disabled = true;
  document.body.dataset.state = "loading";
  try {
    const data = await api("POST", "/attribute", { prompt: q.prompt, response: q.response, k: q.k, mode: q.mode,
                                                  precision: q.precision, direction: q.direction });
    if (seq !== searchSeq) return;
    if (!data.results.length) {
      setStatus(status, "empty", "No documents: the index returned no results for this query.");
      document.body.dataset.state = "empty";
      return;
    }
    const groups = groupDuplicates(data.results);
    const top = Math.max(...data.results.map((r) => Math.abs(r.score))) || 1;
    const dupNote = groups.length < data.results.length ? ` (${data.results.length - groups.length} duplicate texts collapsed)` : "";
    setStatus(status, "", `${data.results.length} of ${data.n_documents} documents by ${data.mode} score (${data.precision} precision)${data.direction === "opponents" ? ", lowest first (opponents)" : ""}${dupNote} · ` +
      `${data.query.n_response_tokens} response tokens scored${data.query.truncated ? " (query truncated)" : ""} · ${data.took_ms} ms`);
    for (const g of groups) list.append(renderResult(g, q, top, q.tok));
    document.body.dataset.state = "results";
  } catch (e) {
    if (seq !== searchSeq) return;
    setStatus(status, "error", "Error: " + e.message);
    document.body.dataset.state = "error";
  } finally {
    if (seq === searchSeq) $("submit").disabled = false;
  }
}

function showIdle() {
  $("results").textContent = "";
  setStatus($("status"), "empty", "Type a response (and, optionally, the prompt before it), then press Attribute to see " +
    "the training documents that most influenced it. The query is kept in the address bar, so a result page can be shared.");
  document.body.dataset.state = "idle";
}

function routeSearch() {
  const q = queryFromURL();
  fillForm(q);
  if (q.response) runSearch(q); else showIdle();
}

// ---- document page -------------------------------------------------------------------------

async function routeDocument() {
  $("search-view").hidden = true;
  $("doc-view").hidden = false;
  const q = queryFromURL();
  const back = $("back");
  if (q.response) back.href = searchURL(q, { tok: q.id });
  else { back.href = "/"; back.textContent = "← new search"; }
  const status = $("doc-status");
  if (!q.id) { setStatus(status, "error", "No document id in the address (?id=...)."); return; }
  setStatus(status, "loading", "Loading document…");
  document.title = q.id + " · logra-search";
  let d;
  try {
    d = await api("GET", "/documents?id=" + encodeURIComponent(q.id));
  } catch (e) {
    setStatus(status, "error", (e.status === 404 ? "Not found: " : "Error: ") + e.message);
    document.body.dataset.state = "error";
    return;
  }
  setStatus(status, "", "");
  $("doc").hidden = false;
  $("doc-id").textContent = d.id;
  const meta = $("doc-meta");
  const row = (k, v) => meta.append(el("dt", { text: k }), el("dd", { text: typeof v === "string" ? v : JSON.stringify(v), dataset: { field: k } }));
  if (d.source) row("record", d.source + (d.line ? ":" + d.line : ""));
  for (const [k, v] of Object.entries(d.metadata || {})) row(k, v);
  row("tokens", d.n_tokens + (d.truncated ? " (truncated when indexed)" : ""));
  if (d.prompt) { $("doc-prompt-section").hidden = false; $("doc-prompt").textContent = d.prompt; }
  $("doc-text").textContent = d.text;
  document.body.dataset.state = "document";
  if (q.response) {
    $("doc-tokens-section").hidden = false;
    renderTokenView($("doc-tokens"), q, d.id);
  }
}

// ---- value view: what each group of documents was worth over a set of queries ------------------

function parseQueries(text) {
  const out = [];
  text.split(/\r?\n/).forEach((line, i) => {
    if (!line.trim()) return;
    let o;
    try { o = JSON.parse(line); } catch (e) { throw new Error(`line ${i + 1}: not JSON`); }
    const response = o && typeof o === "object" ? (typeof o.response === "string" ? o.response : o.text) : undefined;
    if (typeof response !== "string") throw new Error(`line ${i + 1}: needs a "response" (or "text") string`);
    out.push({ prompt: typeof o.prompt === "string" ? o.prompt : "", response });
  });
  if (!out.length) throw new Error("no queries: paste or upload one JSON object per line");
  return out;
}

function valueRequest() {
  const field = $("value-field").value.trim();
  if (!field) throw new Error("name a metadata field to group the documents by");
  return { queries: parseQueries($("value-queries").value), group_by: [field], mode: $("value-mode").value,
           precision: $("value-precision").value };
}

function groupLabel(group, fields) {
  return fields.map((f) => f in group ? `${f} = ${typeof group[f] === "string" ? group[f] : JSON.stringify(group[f])}`
                                      : `(no ${f})`).join(", ");
}

function valueChart(g, scale) {
  const x = (v) => 50 + 50 * v / scale;  // percent of the chart's width; 0 in the middle
  const bar = el("span", { class: "vbar" + (g.value < 0 ? " negative" : "") });
  bar.style.left = Math.min(x(0), x(g.value)).toFixed(2) + "%";
  bar.style.width = Math.abs(x(g.value) - x(0)).toFixed(2) + "%";
  const chart = el("div", { class: "vchart", title: `value ${fmt(g.value)}` }, el("span", { class: "axis" }), bar);
  chart.firstChild.style.left = "50%";
  if (g.ci_low !== null && g.ci_high !== null) {
    const ci = el("span", { class: "ci" });
    ci.style.left = x(g.ci_low).toFixed(2) + "%";
    ci.style.width = Math.max(0.5, x(g.ci_high) - x(g.ci_low)).toFixed(2) + "%";
    chart.append(ci);
  }
  return chart;
}

function toggleGroup(tr, g) {
  const open = tr.getAttribute("aria-expanded") !== "true";
  tr.setAttribute("aria-expanded", String(open));
  if (!open) { tr.nextSibling.remove(); return; }
  const list = el("ul", { class: "top-docs" });
  for (const d of g.top_documents) {
    list.append(el("li", {}, el("a", { href: documentURL(d.id), class: "doc-link", text: d.id }),
                   el("span", { class: "mono", text: fmt(d.value) })));
  }
  const cell = el("td", { colspan: "7" }, el("div", { class: "muted", text: `top ${g.top_documents.length} documents` }), list);
  tr.after(el("tr", { class: "group-docs" }, cell));
}

function renderValue(data) {
  const rows = $("value-rows");
  rows.textContent = "";
  const scale = Math.max(1e-300, ...data.groups.flatMap((g) => [g.value, g.ci_low, g.ci_high].filter((v) => v !== null).map(Math.abs)));
  for (const g of data.groups) {
    const tr = el("tr", { class: "group-row", tabindex: "0", "aria-expanded": "false" },
      el("td", { class: "group-name", text: groupLabel(g.group, data.group_by) }),
      el("td", { class: "num", text: String(g.n_documents) }),
      el("td", {}, valueChart(g, scale)),
      el("td", { class: "num value", text: fmt(g.value) }),
      el("td", { class: "num", text: g.ci_low === null ? "-" : `[${fmt(g.ci_low)}, ${fmt(g.ci_high)}]` }),
      el("td", { class: "num", text: (100 * g.share_positive).toFixed(1) + "%" }),
      el("td", { class: "num", text: (100 * g.share_negative).toFixed(1) + "%" }));
    tr.addEventListener("click", () => toggleGroup(tr, g));
    tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter") toggleGroup(tr, g); });
    rows.append(tr);
  }
  $("value-table").hidden = false;
  $("value-summary").textContent = `${data.n_documents} documents in ${data.groups.length} groups, valued over ` +
    `${data.n_queries} queries (${data.mode}, ${data.precision} precision): total ${fmt(data.total_value)}, ` +
    `positive ${fmt(data.total_positive)}, negative ${fmt(data.total_negative)}. Click a group for its top documents.`;
}

let valueSeq = 0;

async function runValue() {
  const seq = ++valueSeq, status = $("value-status");
  $("value-table").hidden = true;
  $("value-summary").textContent = "";
  $("value-csv").disabled = true;
  let body;
  try { body = valueRequest(); } catch (e) { setStatus(status, "error", e.message); return; }
  setStatus(status, "loading", `Valuing every document over ${body.queries.length} queries…`);
  $("value-submit").disabled = true;
  document.body.dataset.state = "loading";
  try {
    const data = await api("POST", "/value", body);
    if (seq !== valueSeq) return;
    setStatus(status, "", "");
    renderValue(data);
    $("value-csv").disabled = false;
    document.body.dataset.state = "value";
  } catch (e) {
    if (seq !== valueSeq) return;
    setStatus(status, "error", "Error: " + e.message);
    document.body.dataset.state = "error";
  } finally {
    if (seq === valueSeq) $("value-submit").disabled = false;
  }
}

async function downloadValueCSV() {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers["Authorization"] = "Bearer " + key;
  try {
    const r = await fetch("/value", { method: "POST", headers, body: JSON.stringify({ ...valueRequest(), format: "csv" }) });
    if (!r.ok) throw new Error(`the server answered ${r.status}`);
    const a = el("a", { href: URL.createObjectURL(await r.blob()), download: "value.csv" });
    document.body.append(a);
    a.click();
    a.remove();
  } catch (e) {
    setStatus($("value-status"), "error", "Download failed: " + e.message);
  }
}

function routeValue() {
  $("search-view").hidden = true;
  $("value-view").hidden = false;
  document.title = "Value · logra-search";
  document.body.dataset.state = "value-idle";
}

// ---- wiring --------------------------------------------------------------------------------

function route() {
  const path = location.pathname;
  for (const [id, here] of [["nav-value", path.startsWith("/ui/value")], ["nav-search", !path.startsWith("/ui/")]]) {
    if (here) $(id).setAttribute("aria-current", "page"); else $(id).removeAttribute("aria-current");
  }
  if (path.startsWith("/ui/document")) routeDocument();
  else if (path.startsWith("/ui/value")) routeValue();
  else routeSearch();
}

document.addEventListener("DOMContentLoaded", () => {
  loadIndexInfo();
  $("query").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = formQuery();
    history.pushState(null, "", searchURL(q));
    runSearch(q);
  });
  for (const id of ["prompt", "response"]) {
    $(id).addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); $("query").requestSubmit(); }
    });
  }
  $("value-form").addEventListener("submit", (ev) => { ev.preventDefault(); runValue(); });
  $("value-csv").addEventListener("click", downloadValueCSV);
  $("value-file").addEventListener("change", async () => {
    const f = $("value-file").files[0];
    if (f) $("value-queries").value = await f.text();
  });
  window.addEventListener("popstate", route);
  route();
});
