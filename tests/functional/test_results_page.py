"""Proves the results page (/polls/{poll}, engine/static/) on `votes serve` in the embedded
default, in headless Debian chromium driven by Playwright (executable_path, no downloaded
browser): the page shows the counts, updates after new votes without a reload (the ingest
role's own SSE stream), shows "final" after the close, and checks a receipt (counted, and a
tampered one refused), and the poll's per-country breakdown (a "By country" row per country
claim of the voters' tokens, updated live); it carries a Content-Security-Policy. A screenshot is saved under the
test's tmp dir. Also: the stream and the receipt endpoint answer as engine/openapi.yaml says.
"""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from deploy.local.installer import ensure_debian_package
from engine.keys import load_keys
from engine.tokens import issue_admin_token, issue_voter_token
from tests.support import http_client
from tests.support.engine_process import EngineProcess

WAIT_MS = 10_000


def test_results_page_live_final_and_receipt(tmp_path: Path) -> None:
    chromium = ensure_debian_package("chromium", "chromium")
    engine = EngineProcess(tmp_path / "data", tmp_path / "engine.log", {"VOTES_SHARDS": "4"},
                           workers=2)
    engine.start()
    try:
        engine.wait_ready()
        keyring = load_keys(tmp_path / "data")
        admin = {"authorization": f"Bearer {issue_admin_token(keyring, ttl_s=600)}"}
        base = engine.base_url

        def vote(voter: int, option: str) -> dict:
            token = issue_voter_token(keyring, voter, ttl_s=600,
                                      country="FR" if voter == 2 else "DE")
            answer = http_client.post(f"{base}/v1/polls/show/votes", json={"option": option},
                                      headers={"authorization": f"Bearer {token}"})
            assert answer.status_code == 201
            return answer.json()

        assert http_client.post(base + "/v1/polls", headers=admin,
                                json={"id": "show", "options": ["red", "blue"],
                                      "breakdown": ["country"]}).status_code == 201
        receipt = vote(1, "red")["receipt"]
        vote(2, "blue")
        page_answer = http_client.get(base + "/polls/show")
        assert page_answer.status_code == 200
        assert "script-src 'self'" in page_answer.headers["content-security-policy"]
        assert page_answer.headers["x-content-type-options"] == "nosniff"
        assert http_client.get(base + "/v1/receipts/r2.garbage").status_code == 400
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium,
                                                 args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(base + "/polls/show")
            expect(page.locator("#total")).to_have_text("2", timeout=WAIT_MS)
            expect(page.locator('.bar[data-option="red"] .count')).to_have_text("1")
            expect(page.locator("#status")).to_have_text("provisional")
            vote(3, "red")
            vote(4, "red")
            expect(page.locator("#total")).to_have_text("4", timeout=WAIT_MS)
            expect(page.locator('.bar[data-option="red"] .count')).to_have_text("3")
            expect(page.locator("#countries tr", has_text="DE")).to_contain_text("red 3")
            expect(page.locator("#countries tr", has_text="FR")).to_contain_text("blue 1")
            assert http_client.post(base + "/v1/polls/show/close",
                                    headers=admin).status_code == 200
            expect(page.locator("#status")).to_have_text("final", timeout=WAIT_MS)
            page.fill("#receipt", receipt)
            page.click("#check")
            expect(page.locator("#receipt-result")).to_contain_text("counted (option red, final",
                                                                    timeout=WAIT_MS)
            tampered = receipt[:-6] + ("AAAAAA" if not receipt.endswith("AAAAAA") else "BBBBBB")
            page.fill("#receipt", tampered)
            page.click("#check")
            expect(page.locator("#receipt-result")).not_to_contain_text("checking",
                                                                        timeout=WAIT_MS)
            assert "counted (option red" not in page.locator("#receipt-result").inner_text() \
                or "not counted" in page.locator("#receipt-result").inner_text()
            page.screenshot(path=str(tmp_path / "results-page.png"), full_page=True)
            browser.close()
        assert (tmp_path / "results-page.png").stat().st_size > 0
        status = http_client.get(base + "/v1/receipts/" + receipt)
        assert status.status_code == 200 and status.json()["status"] == "counted"
    finally:
        engine.stop()
