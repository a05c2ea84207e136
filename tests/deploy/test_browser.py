"""The upload page in a real browser: Debian's headless Chromium driven by Playwright.

The app runs with uvicorn on 127.0.0.1 and a free port; the test picks a real X-ray
through the page's labelled file input and checks what a user would see: a class, a
probability bar per class, the threshold and a Grad-CAM heatmap that the browser has
decoded; then that a bad file gets a readable error. A screenshot goes to /tmp/page.png.
"""

from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "samples_original"
SCREENSHOT = Path("/tmp/page.png")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HEATMAP_LOADED = """() => {
    const img = document.getElementById("heatmap");
    return img.src.startsWith("data:image/png;base64,") && img.complete && img.naturalWidth > 0;
}"""


@pytest.fixture(scope="module")
def page_url(request):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (.ci/install-browser) to run the browser test")
    if not SAMPLES.is_dir():
        pytest.skip(f"shared data is absent ({SAMPLES}); the browser test uploads a real X-ray")
    pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is not installed")
    from xferlearn.deploy.serve import create_app, serve_in_thread

    tiny_run = request.getfixturevalue("tiny_run")  # trained only once nothing above has skipped
    with serve_in_thread(create_app(tiny_run)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def test_upload_page_shows_class_bars_threshold_and_heatmap(page_url, browser, tiny_run):
    from playwright.sync_api import expect

    from xferlearn.models.checkpoint import load_checkpoint

    xray = sorted((SAMPLES / "PNEUMONIA").glob("*.jpeg"))[0]
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(page_url + "/")
    expect(page.locator("#model-info")).to_contain_text(load_checkpoint(tiny_run).backbone)

    page.get_by_label("Choose an image").set_input_files(str(xray))  # the input's accessible label
    expect(page.get_by_role("heading", name="Prediction")).to_be_visible(timeout=60_000)
    page.wait_for_function(HEATMAP_LOADED, timeout=60_000)

    predicted = page.locator("#predicted-class").inner_text()
    assert predicted in ("NORMAL", "PNEUMONIA")
    meters = page.get_by_role("meter")
    expect(meters).to_have_count(2)
    values = [float(meters.nth(i).get_attribute("aria-valuenow")) for i in range(2)]
    assert sum(values) == pytest.approx(1, abs=1e-3)
    expect(page.locator("#threshold-info")).to_contain_text("threshold")
    expect(page.locator("#heatmap")).to_be_visible()
    expect(page.get_by_role("alert")).to_be_hidden()
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    page.close()


def test_upload_page_explains_a_bad_file(page_url, browser):
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(page_url + "/")
    page.get_by_label("Choose an image").set_input_files(
        {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"these are not pixels\n"})
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible(timeout=30_000)
    expect(alert).to_contain_text("notes.jpg")
    expect(alert).to_contain_text("not an image")
    expect(page.locator("#result")).to_be_hidden()
    page.close()

