"""Screenshots of a review in the MLflow UI, for docs/review.md: headless Chromium (Debian's
``/usr/bin/chromium``) driven by Playwright (``pip install playwright``; no browser download).

    python scripts/review_screenshots.py --home DIR [--audit AUDIT] [--query QUERY_ID] [--out docs/screenshots]

Needs the UI served (``influence-audit ui --home DIR`` prints how). Clicks as a reviewer does: the run's traces
tab, one query's trace, its first candidate's span, Assess -> Add feedback -> Human feedback, name
``culprit``, True, a rationale, Create. It really logs that assessment (the last screenshot shows it), so run it
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
        if loc.count() and loc.first.is_visible():
            loc.first.click()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True)
    ap.add_argument("--audit")
    ap.add_argument("--query", help="query id whose trace is opened (default: the first)")
    ap.add_argument("--reviewer-note", default="states the planted fact outright")
    ap.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    ap.add_argument("--port", type=int, default=5000)
    a = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from tasks.record.traces import document_texts, span_name
    from tasks.record.ui import audit_ui
    from tasks.review.decisions import load_candidates

    info = audit_ui(a.home, a.audit, port=a.port, per_query=True)
    query = a.query or sorted(info["urls"]["trace"])[0]
    cands = load_candidates(a.home, info["audit_id"])
    top = cands.filter((cands["query_id"] == query) & (cands["rank"] == 1)).row(0, named=True)
    span = span_name(1, top["score"], document_texts(Path(a.home) / "audits" / info["audit_id"],
                                                     [top["train_id"]]).get(top["train_id"]) or top["snippet"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(info["urls"]["traces"])
        page.get_by_text(f'"{query}"').first.wait_for(timeout=90_000)
        _tidy(page)
        page.screenshot(path=out / "review-1-run-traces.png")
        page.get_by_text(f'"{query}"').first.click()
        page.get_by_text(span, exact=True).first.wait_for(timeout=60_000)
        _tidy(page)
        page.screenshot(path=out / "review-2-trace.png")
        page.get_by_text(span, exact=True).first.click()
        page.wait_for_timeout(1000)
        page.get_by_text("Assess", exact=True).first.click()
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
        page.get_by_text("True", exact=True).first.click()  # the default, clicked as a reviewer would
        page.locator('[data-component-id="shared.model-trace-explorer.assessment-rationale-input"]').fill(
            a.reviewer_note)
        page.wait_for_timeout(500)
        page.screenshot(path=out / "review-3-feedback-form.png")
        page.locator('[data-component-id="shared.model-trace-explorer.assessment-create-button"]',
                     has_text="Create").click()
        page.get_by_text(a.reviewer_note).first.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=out / "review-4-feedback-saved.png")
        browser.close()
    print(f"screenshots of audit {info['audit_id']}, query {query} -> {out}")


if __name__ == "__main__":
    main()
