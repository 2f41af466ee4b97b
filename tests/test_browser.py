"""app.py in a real browser: Debian's chromium (no Playwright browser download) driven by Playwright
opens the page served on 127.0.0.1 with tiny exported models, uploads real photos through the image
input (file picker, drag-and-drop, clipboard paste), sees the Grad-CAM overlay appear (one map per model
for the ensemble), switches model, clicks an example and checks the messages shown for bad uploads.
docs/demo.png comes from a trained model, never from these random-init ones: it is rewritten only by
`test_readme_screenshot` when $SCREENSHOT_CNN names a trained CNN export (else into a temp file).
Needs a chromium on PATH (or $CHROMIUM), as .ci/run finds it: skips without one, fails under CI=true."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

import flowers_classifier as fc
from flowers_apps import demo as app

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium")  # the same lookup as .ci/run
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WAIT_MS = 60_000  # upper bound for a prediction on 2 shared CPU cores; passing never depends on speed
CLASS_NAME = re.compile("^(" + "|".join(fc.CLASSES) + ")$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require(CHROMIUM is not None and Path(CHROMIUM).is_file(),
            "needs chromium on PATH or $CHROMIUM: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def url(tiny_cnn_pth, tiny_vit_pth, real_flowers) -> Iterator[str]:
    demo = app.build_demo(tiny_cnn_pth, tiny_vit_pth, real_flowers)
    url = app.launch_demo(demo, "127.0.0.1", free_port(), prevent_thread_lock=True)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture
def page(browser, url) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 820},
                                  permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.goto(url)
    yield page
    context.close()


def upload(page: Page, path: Path) -> None:
    """What a drop or a file-picker choice does: hand the file to the image input's <input type=file>."""
    page.locator("#photo input[type=file]").set_input_files(str(path))


def expect_prediction(page: Page, choice: str) -> None:
    """The label shows one class name with 5 confidence bars, and the timing names the model."""
    expect(page.locator("#timing textarea")).to_have_value(re.compile(rf"^\d+ ms with {choice}$"), timeout=WAIT_MS)
    expect(page.locator("#prediction [data-testid=label-output-value]")).to_have_text(CLASS_NAME)
    expect(page.locator("#prediction [data-testid$=-confidence-set]")).to_have_count(len(fc.CLASSES))


def expect_heat_maps(page: Page, count: int) -> None:
    """The Grad-CAM gallery shows `count` overlays (one per model of the choice)."""
    expect(page.locator("#heatmap img")).to_have_count(count, timeout=WAIT_MS)


def settle(page: Page) -> None:
    """Gradio fades each output's progress overlay out after the value lands: let it finish first."""
    page.wait_for_function("""() => [...document.querySelectorAll("#prediction, #timing, #heatmap")].every(block =>
        [...block.querySelectorAll("[data-testid=status-tracker]")].every(t => getComputedStyle(t).opacity === "0"))""")


def test_upload_photo_shows_label_and_heat_map_then_ensemble(page, real_photos, tmp_path):
    upload(page, real_photos["sunflower"][0])
    expect_prediction(page, app.CNN)
    expect_heat_maps(page, 1)
    page.get_by_label(app.ENSEMBLE).check()
    expect_prediction(page, app.ENSEMBLE)
    expect_heat_maps(page, 2)
    page.get_by_label("Show why (Grad-CAM)").uncheck()
    expect_heat_maps(page, 0)
    settle(page)
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_screenshot(browser, real_photos, tiny_cnn_pth, tmp_path):
    """The README's screenshot: the page serving one CNN with its heat map shown. With $SCREENSHOT_CNN (a
    trained export) it rewrites docs/demo.png; otherwise the same page with the tiny random model goes to a
    temp file, so the screenshot path is tested on every run and docs/demo.png never shows a random model."""
    trained = os.environ.get("SCREENSHOT_CNN")
    shot = ROOT / "docs" / "demo.png" if trained else tmp_path / "demo.png"
    demo = app.build_demo(trained or tiny_cnn_pth, None)
    url = app.launch_demo(demo, "127.0.0.1", free_port(), prevent_thread_lock=True)
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    try:
        page = context.new_page()
        page.goto(url)
        upload(page, real_photos["sunflower"][0])
        expect_prediction(page, app.CNN)
        expect_heat_maps(page, 1)
        settle(page)
        page.screenshot(path=str(shot), full_page=True)
    finally:
        context.close()
        demo.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drop_a_photo_onto_the_image_input(page, real_photos):
    photo = real_photos["dandelion"][0]
    data = page.evaluate_handle(
        """([b64, name]) => { const dt = new DataTransfer();
             dt.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type: "image/jpeg"}));
             return dt; }""", [base64.b64encode(photo.read_bytes()).decode(), photo.name])
    target = page.get_by_role("button", name="Drop an image file here to upload")
    for event in ("dragenter", "dragover", "drop"):
        target.dispatch_event(event, {"dataTransfer": data})
    expect_prediction(page, app.CNN)


def test_paste_a_photo_from_the_clipboard(page, real_photos):
    png = io.BytesIO()
    Image.open(real_photos["tulip"][0]).save(png, "PNG")  # Chromium's async clipboard only carries PNG images
    page.evaluate("""async (b64) => navigator.clipboard.write([new ClipboardItem({"image/png":
                       new Blob([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], {type: "image/png"})})])""",
                  base64.b64encode(png.getvalue()).decode())
    page.get_by_role("button", name="Paste from clipboard").click()
    expect_prediction(page, app.CNN)


def test_clicking_an_example_classifies_it(page):
    page.locator("#examples button:has(img)").first.click()
    expect_prediction(page, app.CNN)


def test_bad_uploads_show_a_message_and_the_page_keeps_working(page, real_photos, tmp_path):
    upload(page, real_photos["daisy"][0])
    expect_prediction(page, app.CNN)
    not_jpeg = tmp_path / "broken.jpg"
    not_jpeg.write_text("this is not a jpeg")
    upload(page, not_jpeg)  # passes the browser's image/* filter: refused by the server
    expect(page.get_by_text("broken.jpg: not a recognised image format")).to_be_visible(timeout=WAIT_MS)
    # The daisy's result must not stay on screen as if it were this file's.
    expect(page.locator("#prediction [data-testid=label-output-value]")).to_have_count(0)
    expect(page.locator("#timing textarea")).to_have_value("")
    notes = tmp_path / "notes.txt"
    notes.write_text("daisy")
    upload(page, notes)  # refused by the page itself before any upload
    expect(page.get_by_text("Invalid file type: notes.txt")).to_be_visible(timeout=WAIT_MS)
    big = tmp_path / "big.jpg"
    big.write_bytes(os.urandom(20 * 2**20 + 1))
    upload(page, big)
    expect(page.get_by_text("exceed the maximum allowed size of 20.0 Mb")).to_be_visible(timeout=WAIT_MS)
    upload(page, real_photos["rose"][0])
    expect_prediction(page, app.CNN)
