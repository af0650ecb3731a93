"""The browsing page in a real browser: Playwright driving Debian's headless chromium against a real
`python -m api` process on a loopback port. Screenshots go to artifacts/screenshots/.

Without chromium or playwright these tests skip locally, and fail when CI=true (CI must run them)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import pytest

from engine import encode, load_model

from .support import REPO, build_corpus_index, running_api, self_cosine_tolerance, synthetic_corpus

SHOTS = REPO / "artifacts" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
XSS_SCRIPT = "<script>window.__xss=1</script>"
XSS_IMG = '<img src=x onerror="window.__xss=2">'
DUP_TEXT = "river stone cloud lamp orbit signal garden copper winter engine"
LONG_TEXT = " ".join(["meadow cipher anchor quartz ember willow canyon socket prism tundra"] * 12)
TIMEOUT_MS = 30_000


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so the browser tests must run (.ci/run installs chromium with apt)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def corpus():
    docs = synthetic_corpus(24, seed=11)
    docs += [
        {"id": "dup-a", "text": DUP_TEXT, "source": "web", "position": 100},
        {"id": "dup-b", "text": DUP_TEXT, "source": "books", "position": 101},
        {"id": "xss-script", "text": XSS_SCRIPT, "source": "web", "position": 102},
        {"id": "xss-img", "text": XSS_IMG, "source": "web", "position": 103},
        {"id": "long-doc", "text": LONG_TEXT, "source": "code", "position": 104},
    ]
    return docs


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, gpt2_dir, corpus):
    return build_corpus_index(tmp_path_factory.mktemp("ui-index"), gpt2_dir, corpus)


@pytest.fixture(scope="module")
def server(browser, index_dir, tmp_path_factory):
    with running_api(index_dir, tmp_path_factory.mktemp("ui-server")) as (base, _, _):
        yield base


@pytest.fixture(scope="module", autouse=True)
def _screenshot_dir():
    if SHOTS.exists():
        for f in SHOTS.glob("*.png"):
            f.unlink()
    SHOTS.mkdir(parents=True, exist_ok=True)


class Watch:
    """Everything a page does that a safe page must not: dialogs, page errors, requests off the server."""

    def __init__(self, page, base):
        self.dialogs, self.errors, self.foreign = [], [], []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith(base) or r.url.startswith("data:") else self.foreign.append(r.url))

    def assert_clean(self, page):
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert not self.dialogs, self.dialogs
        assert not self.errors, self.errors
        assert not self.foreign, self.foreign


def _page(browser, server, bypass_csp):
    context = browser.new_context(viewport={"width": 1200, "height": 900}, bypass_csp=bypass_csp)
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    pg.watch = Watch(pg, server)
    return context, pg


@pytest.fixture
def page(browser, server):
    """The page with its Content-Security-Policy ignored: document text must be inert by how it is
    rendered, not only because the policy would block a script (and the tests evaluate JS)."""
    context, pg = _page(browser, server, bypass_csp=True)
    yield pg
    context.close()


@pytest.fixture
def csp_page(browser, server):
    """The page as served, under its own Content-Security-Policy."""
    context, pg = _page(browser, server, bypass_csp=False)
    yield pg
    context.close()


def shot(page, name: str, full_page: bool = True) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def search(page, base, response, prompt="", k=40, mode="cosine"):
    page.goto(base + "/")
    page.fill("#prompt", prompt)
    page.fill("#response", response)
    page.fill("#k", str(k))
    page.select_option("#mode", mode)
    page.click("#submit")
    page.wait_for_selector("body[data-state=results], body[data-state=error], body[data-state=empty]")


def results(page) -> list[dict]:
    return page.eval_on_selector_all(".result", """els => els.map(e => ({
        id: e.dataset.id, rank: +e.dataset.rank,
        score: +e.querySelector('.score').title,
        pct: +e.querySelector('.bar').dataset.pct,
        fill: e.querySelector('.bar .fill').getBoundingClientRect().width,
        chips: [...e.querySelectorAll('.prov .chip')].map(c => c.dataset.field + '=' + c.textContent),
        snippet: e.querySelector('.snippet').textContent,
        dup: (e.querySelector('.dup') || {}).textContent || null }))""")


def test_index_header_and_idle_state_under_the_pages_own_csp(csp_page, server, gpt2_dir, corpus):
    page = csp_page
    headers = httpx.get(server + "/", timeout=10).headers
    assert "script-src 'self'" in headers["content-security-policy"]
    page.goto(server + "/")
    page.wait_for_selector("#index-info b[data-field=documents]")
    info = page.inner_text("#index-info")
    assert gpt2_dir in info and f"documents {len(corpus)}" in info and "preconditioner ekfac (damping 0.01)" in info
    high = httpx.get(server + "/index", timeout=10).json()["high"]
    assert f"high-fidelity ekfac, dim {high['dim']}" in info
    assert page.get_attribute("body", "data-state") == "idle"
    assert "press Attribute" in page.inner_text("#status")
    assert not page.is_disabled("#direction") and page.input_value("#direction") == "proponents"
    shot(page, "01-idle")
    # the page works under its policy (no inline script, styles set through the CSSOM)
    search(page, server, DUP_TEXT, k=5)
    assert page.locator(".result").count() >= 4
    assert page.locator(".result .bar .fill").first.evaluate("e => e.getBoundingClientRect().width") > 100
    page.locator(".result .tokens-btn").first.click()
    page.wait_for_selector(".tokens .tok[data-score]")
    page.watch.assert_clean(page)


def test_query_shows_ranked_results_with_bars_provenance_duplicates_and_inert_xss(page, server, index_dir, corpus):
    search(page, server, DUP_TEXT)
    res = results(page)
    by_id = {d["id"]: d for d in corpus}
    # all 29 documents, the two duplicates collapsed into one entry
    assert len(res) == len(corpus) - 1
    assert [r["rank"] for r in res] == sorted(r["rank"] for r in res) and res[0]["rank"] == 1
    scores = [r["score"] for r in res]
    assert scores == sorted(scores, reverse=True)
    # the identical texts score alike (cosine 1 against themselves, up to the high stage's storage) and
    # collapse into the top entry
    assert res[0]["id"] in ("dup-a", "dup-b") and res[0]["dup"] == "×2 identical texts"
    assert res[0]["score"] == pytest.approx(1.0, abs=self_cosine_tolerance(index_dir))
    assert "#2" in page.inner_text(".result >> nth=0")  # the other copy's rank is listed
    assert res[1]["rank"] == 3
    # bars scaled to the top score
    assert res[0]["pct"] == pytest.approx(100) and res[0]["fill"] > 100
    for r in res:
        assert r["pct"] == pytest.approx(100 * abs(r["score"]) / abs(res[0]["score"]), abs=0.01)
    assert len({round(r["pct"]) for r in res}) > 3
    # provenance: metadata fields and the file:line
    for r in res:
        doc = by_id[r["id"]]
        assert f"source=source{doc['source']}" in r["chips"] and f"position=position{doc['position']}" in r["chips"]
        assert any(c.startswith("record=recorddata.jsonl:") for c in r["chips"])
    # document text is text: the XSS documents show literally and do nothing
    snippets = {r["id"]: r["snippet"] for r in res}
    assert snippets["xss-script"] == XSS_SCRIPT and snippets["xss-img"] == XSS_IMG
    assert page.locator(".result img").count() == 0 and page.locator("#results script").count() == 0
    # the query lives in the URL
    q = parse_qs(urlparse(page.url).query)
    assert q["response"] == [DUP_TEXT] and q["mode"] == ["cosine"] and q["k"] == ["40"]
    shot(page, "02-results")
    # a long snippet expands to the full text
    long = page.locator(".result[data-id=long-doc]")
    assert long.locator(".snippet").inner_text().endswith("…")
    long.locator("button.expand").click()
    assert long.locator(".snippet").inner_text() == LONG_TEXT
    long.scroll_into_view_if_needed()
    shot(page, "03-expanded", full_page=False)
    long.locator("button.expand").click()
    assert long.locator(".snippet").inner_text().endswith("…")
    page.watch.assert_clean(page)


def test_opponents_are_the_lowest_scores_as_the_api_gives_them_and_stay_in_the_url(page, server):
    page.goto(server + "/")
    page.fill("#response", " paper violet harbor needle falcon")
    page.fill("#k", "6")
    page.select_option("#mode", "influence")
    page.select_option("#direction", "opponents")
    page.click("#submit")
    page.wait_for_selector("body[data-state=results]")
    res = results(page)
    api = httpx.post(server + "/attribute", json={"response": " paper violet harbor needle falcon", "k": 6,
                                                  "mode": "influence", "direction": "opponents"}, timeout=30).json()
    first_of_text = list({r["text"]: r for r in reversed(api["results"])}.values())[::-1]  # the page collapses copies
    shown = sorted(first_of_text, key=lambda r: r["rank"])
    assert [r["id"] for r in res] == [r["id"] for r in shown]
    assert [r["score"] for r in res] == pytest.approx([r["score"] for r in shown], rel=1e-6)
    assert [r["score"] for r in res] == sorted(r["score"] for r in res) and res[0]["score"] < 0
    assert "lowest first" in page.inner_text("#status")
    assert parse_qs(urlparse(page.url).query)["direction"] == ["opponents"]
    shot(page, "10-opponents")
    page.reload()
    page.wait_for_selector("body[data-state=results]")
    assert page.input_value("#direction") == "opponents"
    assert [r["id"] for r in results(page)] == [r["id"] for r in res]
    page.watch.assert_clean(page)


def test_shared_url_reload_restores_results(page, server):
    url = server + "/?" + urlencode({"prompt": "winter engine", "response": " paper violet harbor needle falcon",
                                     "k": "7", "mode": "influence"})
    page.goto(url)
    page.wait_for_selector("body[data-state=results]")
    first = results(page)
    assert len(first) == 7 or (len(first) < 7 and any(r["dup"] for r in first))
    assert page.input_value("#prompt") == "winter engine"
    assert page.input_value("#response") == " paper violet harbor needle falcon"
    assert page.input_value("#k") == "7" and page.input_value("#mode") == "influence"
    page.reload()
    page.wait_for_selector("body[data-state=results]")
    again = results(page)
    assert [(r["id"], r["rank"]) for r in again] == [(r["id"], r["rank"]) for r in first]
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in first], rel=1e-6)
    # a new query pushes history; back returns to the shared one
    page.fill("#response", DUP_TEXT)
    page.click("#submit")
    page.wait_for_function("document.querySelector('.result') && document.querySelector('.result').dataset.id.startsWith('dup')")
    page.go_back()
    page.wait_for_function(f"document.querySelector('#response').value === {json.dumps(' paper violet harbor needle falcon')}")
    page.wait_for_selector("body[data-state=results]")
    assert [r["id"] for r in results(page)] == [r["id"] for r in first]
    page.watch.assert_clean(page)


def test_token_view_highlights_each_response_token(page, server, gpt2_dir):
    response = "lantern meadow cipher anchor quartz ember willow"
    search(page, server, response, k=10, mode="influence")
    top = page.locator(".result").first
    doc_id, doc_score = top.get_attribute("data-id"), float(top.locator(".score").get_attribute("title"))
    top.locator("button.tokens-btn").click()
    page.wait_for_selector(".result >> nth=0 >> .tokens .tok")
    toks = top.locator(".tokens .tok").evaluate_all(
        "els => els.map(e => ({text: e.textContent, score: e.dataset.score === undefined ? null : +e.dataset.score, "
        "a: e.dataset.intensity === undefined ? null : +e.dataset.intensity, bg: getComputedStyle(e).backgroundColor}))")
    _, tok = load_model(gpt2_dir)
    enc = encode(tok, "", response, 128)
    assert len(toks) == len(enc.input_ids) - enc.loss_start  # one element per response token
    assert "".join(t["text"] for t in toks) == response
    assert toks[0]["score"] is None  # nothing predicts the first token
    scored = [t for t in toks if t["score"] is not None]
    assert len(scored) == len(toks) - 1
    assert len({round(t["a"], 3) for t in scored}) > 2 and max(t["a"] for t in scored) == pytest.approx(1.0)
    assert len({t["bg"] for t in scored}) > 2  # intensities differ on screen
    assert sum(t["score"] for t in scored) == pytest.approx(doc_score, rel=1e-3, abs=1e-4 * max(abs(t["score"]) for t in scored))
    legend = top.locator(".token-view .legend").inner_text()
    assert "influence score" in legend and "scored tokens" in legend
    assert parse_qs(urlparse(page.url).query)["tok"] == [doc_id]
    top.scroll_into_view_if_needed()
    shot(page, "04-token-view", full_page=False)
    # the open token view is part of the shared URL
    page.reload()
    page.wait_for_selector(f".result[data-id='{doc_id}'] .tokens .tok")
    assert page.locator(".tokens").count() == 1
    page.watch.assert_clean(page)


def test_document_page_with_back_link_and_inert_xss(page, server, corpus):
    search(page, server, DUP_TEXT, k=40)
    results_url = page.url
    page.click(".result[data-id=xss-img] a.doc-link")
    page.wait_for_selector("body[data-state=document]")
    assert urlparse(page.url).path == "/ui/document"
    q = parse_qs(urlparse(page.url).query)
    assert q["id"] == ["xss-img"] and q["response"] == [DUP_TEXT]
    assert page.inner_text("#doc-id") == "xss-img"
    assert page.inner_text("#doc-text") == XSS_IMG
    meta = page.eval_on_selector_all("#doc-meta dd", "els => Object.fromEntries(els.map(e => [e.dataset.field, e.textContent]))")
    assert meta["source"] == "web" and meta["position"] == "103" and re.search(r"data\.jsonl:\d+$", meta["record"])
    assert page.locator("#doc img, #doc script").count() == 0
    # the token view for this query and this document
    page.wait_for_selector("#doc-tokens .tokens .tok")
    assert page.locator("#doc-tokens .tok[data-score]").count() > 3
    shot(page, "05-document-xss")
    page.watch.assert_clean(page)
    # back to the query that led here
    back = page.get_attribute("#back", "href")
    assert parse_qs(urlparse(back).query)["response"] == [DUP_TEXT]
    page.click("#back")
    page.wait_for_selector("body[data-state=results]")
    assert parse_qs(urlparse(page.url).query)["response"] == parse_qs(urlparse(results_url).query)["response"]
    page.wait_for_selector(".result[data-id=xss-img] .tokens .tok")  # back with its token view open
    # a plain document's page
    page.goto(server + "/ui/document?id=" + corpus[3]["id"])
    page.wait_for_selector("body[data-state=document]")
    assert page.inner_text("#doc-text") == corpus[3]["text"]
    assert page.get_attribute("#back", "href") == "/" and page.is_hidden("#doc-tokens-section")
    shot(page, "06-document")
    page.watch.assert_clean(page)


def test_error_and_empty_states(page, server):
    # blank response: the API's message is shown
    search(page, server, "   ")
    assert page.get_attribute("body", "data-state") == "error"
    assert "non-whitespace" in page.inner_text("#status.error")
    assert page.locator(".result").count() == 0
    shot(page, "07-error")
    # a response with no token to score
    search(page, server, "r")
    assert "no token to score" in page.inner_text("#status.error")
    # unknown document
    page.goto(server + "/ui/document?id=no-such-doc&response=river")
    page.wait_for_selector("body[data-state=error]")
    assert "no-such-doc" in page.inner_text("#doc-status.error")
    # empty results (an index with no match): served by the page's own rendering of an empty list
    page.route("**/attribute", lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(
        {"results": [], "mode": "influence", "k": 5, "n_documents": 0, "took_ms": 1.0,
         "query": {"n_tokens": 3, "n_response_tokens": 2, "truncated": False}})))
    search(page, server, "river stone cloud", mode="influence")
    page.wait_for_selector("body[data-state=empty]")
    assert "No documents" in page.inner_text("#status")
    shot(page, "08-empty")
    # loading: the status says so while the request is pending, and the button is disabled
    page.unroute("**/attribute")
    held = []
    page.route("**/attribute", lambda route: held.append(route))  # hold the request until the loading state is checked
    page.fill("#response", "river stone cloud")
    page.click("#submit")
    page.wait_for_selector("#status.loading")
    assert page.is_disabled("#submit") and page.get_attribute("body", "data-state") == "loading"
    shot(page, "09-loading", full_page=False)
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(50)
    held[0].continue_()
    page.wait_for_selector("body[data-state=results]")
    page.watch.assert_clean(page)


def test_precision_fast_and_high_are_the_apis_and_stay_in_the_url(page, server):
    response = "river stone cloud lamp orbit signal"
    for precision in ("fast", "high"):
        page.goto(server + "/")
        page.fill("#response", response)
        page.fill("#k", "5")
        page.select_option("#precision", precision)
        page.click("#submit")
        page.wait_for_selector("body[data-state=results]")
        api = httpx.post(server + "/attribute", json={"response": response, "k": 5, "precision": precision},
                         timeout=30).json()
        assert api["precision"] == precision and {r["stage"] for r in api["results"]} == {precision}
        first_of_text = list({r["text"]: r for r in reversed(api["results"])}.values())[::-1]
        shown = sorted(first_of_text, key=lambda r: r["rank"])
        res = results(page)
        assert [r["id"] for r in res] == [r["id"] for r in shown]
        assert [r["score"] for r in res] == pytest.approx([r["score"] for r in shown], rel=1e-6)
        assert f"({precision} precision)" in page.inner_text("#status")
        assert parse_qs(urlparse(page.url).query).get("precision", ["high"]) == [precision]
        page.reload()
        page.wait_for_selector("body[data-state=results]")
        assert page.input_value("#precision") == precision
    page.watch.assert_clean(page)


VALUE_QUERIES = [{"prompt": "winter engine", "response": " paper violet harbor needle"},
                 {"prompt": "", "response": "river stone cloud lamp orbit"},
                 {"prompt": "falcon", "response": " marble thunder velvet lantern"}]


def test_value_view_charts_the_apis_groups_and_downloads_its_csv(csp_page, server, tmp_path):
    """Under the page's own CSP: pasted queries valued by source; the rows, bars and intervals are the
    API's /value answer; a group opens its top documents; the CSV download is the API's CSV."""
    page = csp_page
    api = httpx.post(server + "/value", json={"queries": VALUE_QUERIES, "group_by": ["source"]}, timeout=60).json()
    page.goto(server + "/ui/value")
    assert page.get_attribute("#nav-value", "aria-current") == "page"
    page.fill("#value-queries", "\n".join(json.dumps(q) for q in VALUE_QUERIES) + "\n")
    page.fill("#value-field", "source")
    page.click("#value-submit")
    page.wait_for_selector("body[data-state=value], body[data-state=error]")
    shot(page, "value-view")
    rows = page.eval_on_selector_all(".group-row", """els => els.map(e => ({
        name: e.querySelector('.group-name').textContent, value: e.querySelector('.value').textContent,
        bar: e.querySelector('.vbar').getBoundingClientRect().width, negative: e.querySelector('.vbar').classList.contains('negative'),
        ci: !!e.querySelector('.ci')}))""")
    assert [r["name"] for r in rows] == [f"source = {g['group']['source']}" for g in api["groups"]]
    top = max(abs(g["value"]) for g in api["groups"])
    for r, g in zip(rows, api["groups"]):
        assert float(r["value"]) == pytest.approx(g["value"], rel=1e-3)
        assert r["negative"] == (g["value"] < 0) and r["ci"]
    widest = max(rows, key=lambda r: r["bar"])
    assert float(widest["value"]) == pytest.approx(max((g["value"] for g in api["groups"]), key=abs), rel=1e-3) and top > 0

    page.click(".group-row >> nth=0")
    links = page.eval_on_selector_all(".group-docs .doc-link", "els => els.map(e => e.textContent)")
    assert links == [d["id"] for d in api["groups"][0]["top_documents"]]

    with page.expect_download() as dl:
        page.click("#value-csv")
    got = Path(dl.value.path()).read_text()
    want = httpx.post(server + "/value", json={"queries": VALUE_QUERIES, "group_by": ["source"], "format": "csv"},
                      timeout=60).text
    assert got.replace("\r\n", "\n") == want.replace("\r\n", "\n")
    page.watch.assert_clean(page)

    page.fill("#value-queries", "{not json")  # a bad line says which, without a request
    page.click("#value-submit")
    assert "line 1" in page.text_content("#value-status")
    page.fill("#value-queries", json.dumps(VALUE_QUERIES[0]))
    page.fill("#value-field", "provider")  # a field no document has: the API's 422, shown
    page.click("#value-submit")
    page.wait_for_selector("body[data-state=error]")
    assert "provider" in page.text_content("#value-status")


@pytest.fixture(scope="module")
def pair_server(browser, gpt2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-pairs")
    records = [{"id": f"p{i}", "q": f"{w} harbor question", "a": f" needle {w} beacon ledger answer"}
               for i, w in enumerate(["prism", "tundra", "nickel", "saddle", "raven", "cobalt"])]
    index = build_corpus_index(root, gpt2_dir, records, prompt_field="q", response_field="a")
    (root / "log").mkdir()
    with running_api(index, root / "log") as (base, _, _):
        yield base


def test_results_show_a_documents_prompt_apart_from_its_response(browser, pair_server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    try:
        page.goto(pair_server + "/?" + urlencode({"prompt": "prism harbor question", "response": "needle prism beacon"}))
        page.wait_for_selector("body[data-state=results]")
        first = page.eval_on_selector(".result", """e => ({id: e.dataset.id,
            prompt: e.querySelector('.prompt-snippet').textContent, response: e.querySelector('.snippet').textContent})""")
        shot(page, "prompt-apart")
        assert first["id"] == "p0"
        assert first["prompt"] == "promptprism harbor question\n"  # the label, then the context as stored
        assert first["response"] == " needle prism beacon ledger answer"
    finally:
        context.close()
