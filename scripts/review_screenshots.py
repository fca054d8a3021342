"""Screenshots of a review in the MLflow UI, for docs/review.md: headless Chromium (Debian's
``/usr/bin/chromium``) driven by Playwright (``pip install playwright``; no browser download).

    python scripts/review_screenshots.py --home DIR [--audit AUDIT] [--query QUERY_ID] [--out docs/screenshots]
        [--tracking-uri http://HOST:PORT] [--rank N] [--refusal]

Needs the UI served (``influence-audit ui --home DIR`` prints how) or a tracking server (``--tracking-uri``). On
a server with authentication it logs in as ``$MLFLOW_TRACKING_USERNAME`` / ``$MLFLOW_TRACKING_PASSWORD`` (the
browser's basic-auth login). Clicks as a reviewer does: the run's traces tab, one query's trace, the candidate
of rank ``--rank``, Assess -> Add feedback -> Human feedback, name ``culprit``, True, a rationale, Create. With
``--refusal`` it then marks the query's root span (the request the UI sends, as that user), pulls (as
``review pull`` does) and shows the refusal answered beside the mark. It really logs these assessments, so run it
on a demo home, not on an audit under review.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-component-update", "--disable-sync", "--disable-quic"]


def _tidy(page) -> None:
    """Close MLflow's Assistant panel and the issue-detection tip (they cover the table)."""
    for sel in ('[data-component-id="mlflow.assistant.chat_panel.close"]',
                '[data-component-id="mlflow.detect_issues.guidance.dismiss"]'):
        loc = page.locator(sel)
        try:
            if loc.count() and loc.first.is_visible():
                loc.first.click(timeout=3000)
        except Exception:  # noqa: BLE001 (covered by the trace drawer: nothing to tidy there)
            pass


def _show_assessments(page, span: str) -> None:
    """The span's assessments pane, once the saved marks are listed ("Feedback (n)"); reloads until they are."""
    import re

    listed = page.get_by_text(re.compile(r"^Feedback \(\d+\)$"))
    for _ in range(4):
        try:
            listed.first.wait_for(timeout=20_000)
            return
        except Exception:  # noqa: BLE001 (not refetched yet: reload, select the span, open the pane)
            page.reload()
            page.get_by_text(span, exact=True).first.wait_for(timeout=90_000)
            _tidy(page)
            page.get_by_text(span, exact=True).first.click()
            page.wait_for_timeout(1000)
            assess = page.get_by_role("button", name=re.compile(r"^Assess"))
            if assess.count() and not page.get_by_text("Add feedback").count():
                assess.first.click()
    listed.first.wait_for(timeout=20_000)


def _refusal(a, info, query: str, page, shot, login) -> None:
    """A mark on the query's root span (the request the UI's Create sends), a pull, the answer beside the mark."""
    import httpx

    from tasks.record.traces import QUERY_TAG, audit_traces
    from tasks.record.tracker import tracker
    from tasks.review.pull import pull_review

    exp = tracker().experiment_of(info["run_id"])
    trace = next(t for t in audit_traces(exp, info["audit_id"], include_spans=True) if t.info.tags[QUERY_TAG] == query)
    root = next(s for s in trace.data.spans if s.parent_id is None)
    body = {"assessment": {"assessment_name": "culprit", "trace_id": trace.info.trace_id, "span_id": root.span_id,
                           "source": {"source_type": "HUMAN", "source_id": "User"}, "rationale": "the whole query",
                           "feedback": {"value": True}}}
    base = info["urls"]["run"].split("/#/")[0]
    r = httpx.post(f"{base}/ajax-api/3.0/mlflow/traces/{trace.info.trace_id}/assessments", json=body, timeout=30,
                   auth=(login["username"], login["password"]) if login else None)
    r.raise_for_status()
    result = pull_review(a.home, info["audit_id"], tracking_uri=a.tracking_uri)
    print("\n".join(result["refused"]))
    import re

    page.reload()  # the same trace, refetched: the answer is there now
    page.get_by_text(query, exact=True).first.wait_for(timeout=90_000)
    _tidy(page)
    page.get_by_text(query, exact=True).first.click()  # the root span, where the wrong mark sits
    page.wait_for_timeout(1000)
    if not page.get_by_text("culprit not recorded").first.is_visible():
        page.get_by_role("button", name=re.compile(r"^Assess")).first.click()
    page.get_by_text("culprit not recorded").first.wait_for(state="visible", timeout=60_000)
    for chevron in page.locator('[data-component-id*="assessment"] [aria-label*="xpand"]').all()[:4]:
        try:  # open each mark: value, rationale, source
            chevron.click(timeout=2000)
        except Exception:  # noqa: BLE001
            pass
    page.wait_for_timeout(1500)
    shot(page, 5, "refused-mark")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True)
    ap.add_argument("--audit")
    ap.add_argument("--query", help="query id whose trace is opened (default: the first)")
    ap.add_argument("--reviewer-note", default="states the planted fact outright")
    ap.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--tracking-uri", help="an MLflow server (default: the audit's, else a local `mlflow ui`)")
    ap.add_argument("--rank", type=int, default=1, help="the candidate marked (rank in the query)")
    ap.add_argument("--refusal", action="store_true", help="also mark the root span and show the refusal")
    ap.add_argument("--prefix", default="review", help="file names: PREFIX-1-run-traces.png, ...")
    a = ap.parse_args()

    import os

    from playwright.sync_api import sync_playwright

    from tasks.record.traces import document_texts, span_name
    from tasks.record.ui import audit_ui
    from tasks.review.decisions import load_candidates

    info = audit_ui(a.home, a.audit, port=a.port, per_query=True, tracking_uri=a.tracking_uri)
    query = a.query or sorted(info["urls"]["trace"])[0]
    cands = load_candidates(a.home, info["audit_id"])
    top = cands.filter((cands["query_id"] == query) & (cands["rank"] == a.rank)).row(0, named=True)
    span = span_name(a.rank, top["score"], document_texts(Path(a.home) / "audits" / info["audit_id"],
                                                          [top["train_id"]]).get(top["train_id"]) or top["snippet"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    login = {"username": user, "password": os.environ.get("MLFLOW_TRACKING_PASSWORD", "")} if user else None
    shot = lambda page, n, what: page.screenshot(path=out / f"{a.prefix}-{n}-{what}.png")  # noqa: E731
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1600, "height": 1000}, http_credentials=login).new_page()
        page.goto(info["urls"]["traces"])
        page.get_by_text(f'"{query}"').first.wait_for(timeout=90_000)
        _tidy(page)
        shot(page, 1, "run-traces")
        page.get_by_text(f'"{query}"').first.click()
        page.get_by_text(span, exact=True).first.wait_for(timeout=60_000)
        _tidy(page)
        shot(page, 2, "trace")
        page.get_by_text(span, exact=True).first.click()
        page.wait_for_timeout(1000)
        import re

        page.get_by_role("button", name=re.compile(r"^Assess")).first.click()
        add = page.locator('[data-component-id="shared.model-trace-explorer.add-feedback"]')
        add.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        add.click()
        human = page.get_by_text("Human feedback", exact=True)  # a menu only where LLM judges are set up
        try:
            human.wait_for(timeout=3000)
            human.click()
        except Exception:  # noqa: BLE001 (playwright's TimeoutError: the form is open already)
            pass
        page.get_by_placeholder("Enter a feedback name").fill("culprit")
        page.wait_for_timeout(800)
        page.get_by_role("option", name="culprit").first.click()
        page.get_by_text("True", exact=True).last.click()  # the form's value (the default, clicked as a reviewer
        # would); .last: a verified candidate's attributes also say True
        page.locator('[data-component-id="shared.model-trace-explorer.assessment-rationale-input"]').fill(
            a.reviewer_note)
        page.wait_for_timeout(500)
        shot(page, 3, "feedback-form")
        create = page.locator('[data-component-id="shared.model-trace-explorer.assessment-create-button"]',
                              has_text="Create")
        create.click()
        create.wait_for(state="detached", timeout=60_000)  # the form closes once the assessment is saved
        _show_assessments(page, span)
        page.wait_for_timeout(1500)
        shot(page, 4, "feedback-saved")
        if a.refusal:
            _refusal(a, info, query, page, shot, login)
        browser.close()
    print(f"screenshots of audit {info['audit_id']}, query {query} -> {out}")


if __name__ == "__main__":
    main()
