"""The web page in a real headless Chromium (Debian's, driven by Playwright): generate with live
previews, see and download the final images, cancel, and paste an API key; 63-bit seeds kept
exactly, the key offered as a WebSocket subprotocol (never in the URL), the gallery layout, the
status line after a blocked submit, and switching the preview kind while running.

Needs `apt-get install -y chromium` and the playwright package; skipped otherwise."""

from __future__ import annotations

import base64
import json
import shutil

import pytest

from server.client import DDPMClient
from tests.server.api.live_server import run_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)")

KEY = "browser-key-0123456789"
BIG_SEED = 1963352424536679345  # above 2**53: a JavaScript number would make it ...9400
# Records every WebSocket the page opens: its URL, the subprotocols offered, the text sent and received.
RECORD_SOCKETS = """
window.sockets = [];
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
    constructor(url, protocols) {
        super(url, protocols);
        this.record = { url: String(url), protocols: protocols === undefined ? [] : [].concat(protocols), sent: [], received: [] };
        window.sockets.push(this.record);
        this.addEventListener("message", (message) => this.record.received.push(message.data));
    }
    send(data) { this.record.sent.push(data); super.send(data); }
};
"""
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
        context.add_init_script(RECORD_SOCKETS)
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
    page.evaluate("""() => {  // count the preview captions the page writes
        window.previews = 0;
        new MutationObserver((changes) => {
            window.previews += changes.filter((c) => /at step/.test(c.target.textContent)).length;
        }).observe(document.querySelector("#gallery"), { subtree: true, childList: true });
    }""")
    run_to_done(page, n=2, steps=20, seed="5", preview_every=2)
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
    sync_api.expect(page.locator("#status")).to_contain_text("the API key was refused")
    assert "closed" in page.locator("#status").inner_text().lower()


def base64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def run_to_done(page, n: int, steps: int, seed: str = "", preview_every: int = 0, **more) -> dict:
    """Fills the form (`more` by input id, interp_t for #interp-t), generates, waits for the
    images and returns the request the page sent."""
    fields = {"n": n, "steps": steps, "seed": seed, "preview-every": preview_every,
              **{name.replace("_", "-"): value for name, value in more.items()}}
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))
    page.click("#generate")
    page.wait_for_function("document.body.dataset.state === 'done'", timeout=120_000)
    return json.loads(page.evaluate("window.sockets.at(-1).sent[0]"))


def captions(page) -> list[str]:
    return page.locator("#gallery .caption").all_inner_texts()


def test_the_key_travels_as_a_subprotocol_never_in_the_url(page):
    run_to_done(page, n=1, steps=2)
    socket = page.evaluate("window.sockets.at(-1)")
    assert socket["url"].endswith("/ws/generate")  # no ?token=
    assert KEY not in socket["url"]
    assert socket["protocols"] == ["ddpm", "bearer." + base64url(KEY)]
    for key in ("ab?ab>x", "k\u00fcy \u2713", "x"):  # base64 with + / and padding; UTF-8
        assert page.evaluate("key => subprotocols(key)", key) == ["ddpm", "bearer." + base64url(key)]


def test_a_typed_seed_above_2_53_survives_the_page(page, server):
    sent = run_to_done(page, n=2, steps=3, seed=str(BIG_SEED))
    assert sent["seed"] == BIG_SEED  # the digits as typed, not a rounded double
    assert f"request seed {BIG_SEED}" in page.locator("#status").inner_text()
    with DDPMClient(server.url, api_key=KEY) as client:
        expected = [image.seed for image in client.generate(n=2, steps=3, seed=BIG_SEED)]
    assert [caption.split()[1] for caption in captions(page)] == [str(seed) for seed in expected]
    with page.expect_download() as download:
        page.locator("a.download").nth(1).click()
    assert download.value.suggested_filename == f"ddpm-{BIG_SEED}-1.png"


def test_the_seeds_the_server_reports_are_shown_exactly(page):
    run_to_done(page, n=3, steps=2)  # random 63-bit seeds: all but certainly above 2**53
    done = json.loads(page.evaluate("window.sockets.at(-1).received.at(-1)"))  # Python reads them exactly
    assert done["type"] == "done"
    assert [caption.split()[1] for caption in captions(page)] == [str(image["seed"]) for image in done["data"]]
    assert f"request seed {done['seed']})" in page.locator("#status").inner_text()


def test_seeds_are_exact_without_json_source_access_too(page):
    """The fallback for browsers whose JSON.parse gives revivers no source text."""
    text = json.dumps({"type": "done", "seed": BIG_SEED, "note": 'a "seed": 5 in a string',
                       "data": [{"index": 0, "seed": 2**63 - 1, "b64_json": ""}], "timings": {"total_s": 1.5}})
    for parse in ("parseQuotingSeeds", "parseMessage"):
        event = page.evaluate(f"text => {parse}(text)", text)
        assert event["seed"] == str(BIG_SEED) and event["data"][0]["seed"] == str(2**63 - 1)
        assert event["note"] == 'a "seed": 5 in a string' and event["timings"]["total_s"] == 1.5


def test_the_page_asks_for_no_favicon_and_gets_no_404(browser, server):
    page = browser.new_page()
    failures = []
    page.on("response", lambda response: response.status >= 400 and failures.append(response.url))
    page.goto(server.url + "/")
    page.wait_for_load_state("networkidle")
    assert page.locator("link[rel=icon]").count() == 1
    assert not [url for url in failures if "/models" not in url]  # /models is 401 until the key is given
    page.close()


def image_rows(page) -> list[int]:
    tops = page.evaluate("[...document.querySelectorAll('#gallery img')].map(i => Math.round(i.getBoundingClientRect().top))")
    return [tops.count(top) for top in sorted(set(tops))]


@pytest.mark.parametrize("width", [1280, 560, 420])
def test_four_images_sit_in_one_row_or_two_by_two(page, width):
    page.set_viewport_size({"width": width, "height": 900})
    run_to_done(page, n=4, steps=2)  # with the long captions of 19-digit seeds
    assert image_rows(page) in ([4], [2, 2])
    if width == 1280:
        assert image_rows(page) == [4]


def test_an_old_error_is_cleared_by_a_blocked_submit_and_by_editing(page):
    page.fill("#api-key", "wrong")
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("refused", timeout=30_000)
    page.fill("#api-key", KEY)
    page.fill("#n", "0")  # below min: the browser blocks the submit
    page.click("#generate")
    assert "refused" not in page.locator("#status").inner_text()
    assert page.evaluate("window.sockets.length") == 1  # nothing was sent
    sync_api.expect(page.locator("#status")).to_contain_text("images")  # says which field
    page.fill("#n", "1")
    sync_api.expect(page.locator("#status")).to_have_text("Ready.")


def test_the_preview_kind_switches_at_once_while_running(page):
    page.fill("#n", "2")
    page.fill("#steps", "50")
    page.fill("#preview-every", "1")
    page.select_option("#preview-kind", "x_t")
    # Switch inside the page the moment both images show an x_t frame past their first, and read
    # the captions in the same turn: no newer frame can have arrived in between.
    page.evaluate("""() => { window.switched = new Promise((resolve) => {
        const observer = new MutationObserver(() => {
            const texts = [...document.querySelectorAll('#gallery .caption')].map((c) => c.textContent);
            const steps = texts.map((t) => (/^x_t at step (\\d+)$/.exec(t) || [])[1]);
            if (texts.length === 2 && steps.every((s) => s && Number(s) >= 2)) {
                observer.disconnect();
                const select = document.querySelector('#preview-kind');
                select.value = 'x0';
                select.dispatchEvent(new Event('change'));
                resolve({ state: document.body.dataset.state,
                          captions: [...document.querySelectorAll('#gallery .caption')].map((c) => c.textContent) });
            }
        });
        observer.observe(document.querySelector('#gallery'), { subtree: true, childList: true, characterData: true });
    }); }""")
    page.click("#generate")
    result = page.evaluate("window.switched")
    assert result["state"] == "running"
    assert all(caption.startswith("x0 at step ") for caption in result["captions"]), result
    assert json.loads(page.evaluate("window.sockets.at(-1).sent[0]"))["preview_kinds"] == ["x_t", "x0"]
    page.select_option("#preview-kind", "x_t")
    page.wait_for_function("document.body.dataset.state === 'done'", timeout=120_000)


def digit_png(tmp_path, name: str, transpose: bool = False):
    from PIL import Image

    pixels = bytearray(28 * 28)
    for y in range(6, 22):
        for x in range(11, 17):
            pixels[(x * 28 + y) if transpose else (y * 28 + x)] = 240
    path = tmp_path / name
    Image.frombytes("L", (28, 28), bytes(pixels)).save(path)
    return path


def choose_images(page, mode: str, **files) -> None:
    """The page in image `mode` with each file (image=, image2=: by input) loaded and drawn."""
    page.select_option("#mode", mode)
    for name, path in files.items():
        page.set_input_files(f"#file-{name}", str(path))
        page.wait_for_function(f"document.querySelector('#canvas-{name}').width === 28")


def test_inpaint_mode_paints_a_mask_and_keeps_the_rest_of_the_image(page, tmp_path):
    choose_images(page, "inpaint", image=digit_png(tmp_path, "digit.png"))
    canvas = page.locator("#canvas-image").bounding_box()
    page.mouse.move(canvas["x"] + 20, canvas["y"] + 20)
    page.mouse.down()
    page.mouse.move(canvas["x"] + 60, canvas["y"] + 40)
    page.mouse.up()
    sent = run_to_done(page, n=1, steps=10, preview_every=2, jump_n_sample=2, jump_length=3)
    assert sent["operation"] == "inpaint" and sent["image"] and sent["mask"]
    assert (sent["jump_n_sample"], sent["jump_length"]) == (2, 3)
    received = [json.loads(text) for text in page.evaluate("window.sockets.at(-1).received")]
    assert received[-1]["type"] == "done" and len(received[-1]["data"]) == 1
    assert {event["total"] for event in received if event["type"] == "progress"} == {19}  # RePaint's U-Net calls


def test_choosing_a_solver_fills_in_its_default_steps(page):
    page.wait_for_function("Object.keys(stepsBySampler).length > 0")
    page.select_option("#sampler", "dpmpp_2m")
    assert page.input_value("#steps") == "20"
    page.select_option("#sampler", "ddpm")
    assert page.input_value("#steps") == "50"  # the tiny model's T, below the page's 100


def test_interpolate_mode_shows_a_strip(page, tmp_path):
    choose_images(page, "interpolate", image=digit_png(tmp_path, "a.png"),
                  image2=digit_png(tmp_path, "b.png", transpose=True))
    sent = run_to_done(page, n=3, steps=10, preview_every=5, interp_t=20)  # 5: the page's default cadence
    assert sent["lambdas"] == [0, 0.5, 1] and sent["t"] == 20
    assert page.locator("#gallery .cell img").count() == 3


def test_an_image_mode_without_an_image_says_so(page):
    page.select_option("#mode", "variation")
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("image: choose an image file first")
