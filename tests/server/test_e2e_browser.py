"""The web page in a real headless Chromium (Debian's, driven by Playwright): generate with live
previews, see and download the final images, cancel, and paste an API key.

Needs `apt-get install -y chromium` and the playwright package; skipped otherwise."""

from __future__ import annotations

import shutil

import pytest

from tests.server.api.live_server import run_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)")

KEY = "browser-key-0123456789"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    with run_server(tiny_weights, tmp_path_factory.mktemp("logs"), "--api-keys", KEY, "--max-preview-fps", "100") as live:
        yield live


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as playwright:
        # A persistent context gives Chromium the fresh --user-data-dir it wants.
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, accept_downloads=True,
        )
        yield context
        context.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    yield page
    page.close()


def test_page_shows_the_model_once_the_key_is_given(page):
    sync_api.expect(page.locator("#model")).to_contain_text("T=50")


def test_generate_shows_live_frames_then_downloadable_images(page, tmp_path):
    page.fill("#n", "2")
    page.fill("#steps", "20")
    page.fill("#seed", "5")
    page.fill("#preview-every", "2")
    page.evaluate("""() => {  // count the preview captions the page writes
        window.previews = 0;
        new MutationObserver((changes) => {
            window.previews += changes.filter((c) => /at step/.test(c.target.textContent)).length;
        }).observe(document.querySelector("#gallery"), { subtree: true, childList: true });
    }""")
    page.click("#generate")
    page.wait_for_function("document.body.dataset.state === 'done'", timeout=120_000)
    assert page.evaluate("window.previews") > 2  # previews arrived before the final images
    images = page.locator("#gallery .cell img")
    assert images.count() == 2
    assert page.evaluate("[...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth === 28)")
    assert page.locator("#gallery img").first.evaluate("i => getComputedStyle(i).imageRendering") == "pixelated"
    assert "request seed 5" in page.locator("#status").inner_text()
    with page.expect_download() as download:
        page.locator("a.download").first.click()
    assert download.value.suggested_filename == "ddpm-5-0.png"
    path = tmp_path / "saved.png"
    download.value.save_as(path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_cancel(page):
    page.fill("#n", "4")
    page.fill("#steps", "50")
    page.fill("#preview-every", "0")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Step')", timeout=60_000)
    page.click("#cancel")
    sync_api.expect(page.locator("#status")).to_have_text("Cancelled.", timeout=60_000)
    assert page.evaluate("document.body.dataset.state") == "idle"


def test_wrong_key_is_reported(page):
    page.fill("#api-key", "wrong")
    page.click("#generate")
    page.wait_for_function("document.body.dataset.state === 'error'", timeout=30_000)
    assert "closed" in page.locator("#status").inner_text().lower()
