"""The web page end to end in headless Chromium (Debian's, driven by Playwright): auto-complete, generate
with live progress, the result and its revised prompt, a rating stored as feedback."""
import os
import shutil

import httpx
import pytest
from test_serve import uvicorn_server

from tessera.serve.app import ServeConfig, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed (setup.sh installs it)")


def test_web_page_autocomplete_generate_progress_feedback(tmp_path):
    from playwright.sync_api import sync_playwright

    from tessera.pipelines.text2image import TextToImage

    app = create_app(ServeConfig(data_dir=str(tmp_path / "serve")), TextToImage())
    with uvicorn_server(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.fill("#prompt", "")
            page.type("#prompt", "red ap")
            page.locator("#suggestions li", has_text="red apple emoji").first.click()
            assert page.input_value("#prompt") == "red apple emoji"
            page.select_option("#size", "512x512")
            page.evaluate("""() => { window.seen = [];
                new MutationObserver(() => window.seen.push(document.getElementById('status').textContent))
                  .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true}); }""")
            page.click("#go")
            page.wait_for_selector("#results figure img", timeout=120_000)
            seen = page.evaluate("window.seen")
            assert any(s.startswith("running · generate · ") and "/20" in s for s in seen), seen
            assert seen[-1] == "succeeded"
            assert page.text_content("#revised") == "revised prompt: red apple emoji"
            size = page.evaluate("() => { const i = document.querySelector('#results img'); return [i.naturalWidth, i.naturalHeight]; }")
            assert size == [512, 512]
            page.click("#results .stars button[data-rating='5']")
            page.wait_for_selector("text=thanks (rated 5)")
        finally:
            browser.close()
        m = httpx.get(url + "/v1/metrics").json()
    assert m["feedback"]["count"] == 1 and m["feedback"]["mean_rating"] == 5.0
