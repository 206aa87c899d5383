"""The browser playground the router serves at ``/``, driven in a real headless Chromium
in front of one real tritonserver (tiny flux-fill): upload, paint a mask, watch the
streamed steps, get the edit; cancel one; pick a template registered over gRPC.

``INSTGENIE_SCREENSHOT=docs/playground.png`` writes a screenshot of the finished page.
"""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from conftest import SIZE, png, template_image
from instgenie.settings import EngineLimits
from instgenie_router.service import Router, RouterConfig
from serving_calls import metric, metrics, register
from test_router import _instance_server, _specs

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402 - only where a browser exists to drive
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

EDIT_TIMEOUT_S = 120.0  # a tiny-model edit takes seconds on a slow CPU; a stuck one fails here
# The stroke painted by _paint, in image pixels; every check "far from it" looks at the
# bottom-right quarter, well clear of the stroke and of the 16-pixel tokens it touches.
STROKE = ((16, 32), (48, 32))
FAR = (slice(80, None), slice(80, None))


@pytest.fixture(scope="module")
def instance(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    server = _instance_server(model_dirs, tmp_path_factory.mktemp("playground"))
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop(drain_timeout_s=0)


@pytest.fixture(scope="module")
def router(instance):  # type: ignore[no-untyped-def]
    config = RouterConfig(_specs([instance]), host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0, scrape_interval_s=0.2)
    with Router(config) as running:
        yield running


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver, router: Router) -> WebDriver:
    """The playground, freshly loaded, once it has listed the router's model."""
    browser.get(f"http://127.0.0.1:{router.http_port}/")
    _until(browser, lambda: browser.find_element(By.ID, "model").text == "instgenie_edit", "the model id is shown", 30)
    return browser


# -- helpers ------------------------------------------------------------------------------------
def _until(driver: WebDriver, condition: Callable[[], Any], what: str, timeout_s: float = EDIT_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(entry["message"] for entry in driver.get_log("browser"))
            raise AssertionError(f"not so after {timeout_s:g} s: {what}; status {_status(driver)!r}\nbrowser log:\n{logs}")
        time.sleep(0.02)


def _status(driver: WebDriver) -> str:
    return driver.find_element(By.ID, "status").text


def _progress(driver: WebDriver) -> tuple[float, float, bool, str, str]:
    """(progress value, its max, whether a result is shown, the status line, its kind) in one round trip."""
    return tuple(driver.execute_script(  # type: ignore[return-value]
        "const p = document.getElementById('progress'), r = document.getElementById('result'),"
        " s = document.getElementById('status');"
        "return [p.value, p.max, (r.getAttribute('src') || '').startsWith('data:image/png;base64,'),"
        " s.textContent, s.dataset.kind];"
    ))  # fmt: skip


def _set(driver: WebDriver, **fields: object) -> None:
    for name, value in fields.items():
        element = driver.find_element(By.ID, name)
        element.clear()
        element.send_keys(str(value))


def _paint(driver: WebDriver, size: int = SIZE) -> None:
    """Drag the mouse along STROKE on the canvas of a ``size``-pixel image (its CSS size scales the image's pixels)."""
    overlay = driver.find_element(By.ID, "overlay")
    scale = overlay.rect["width"] / size

    def offset(x: float, y: float) -> tuple[int, int]:  # from the element's centre, as Selenium wants
        return round(x * scale - overlay.rect["width"] / 2), round(y * scale - overlay.rect["height"] / 2)

    (x0, y0), (x1, _) = STROKE
    actions = ActionChains(driver).move_to_element_with_offset(overlay, *offset(x0, y0)).click_and_hold()
    for x in np.linspace(x0, x1, 8)[1:]:
        actions.move_to_element_with_offset(overlay, *offset(x, y0))
    actions.release().perform()
    _until(driver, lambda: driver.find_element(By.ID, "undo").is_enabled(), "the stroke is recorded", 10)


def _mask(driver: WebDriver) -> Image.Image:
    """The mask PNG the page would send now, as the page builds it."""
    data = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "maskPng().then(b => b.arrayBuffer()).then(a => done(btoa(String.fromCharCode(...new Uint8Array(a)))));"
    )
    return Image.open(io.BytesIO(base64.b64decode(data)))


def _canvas_pixels(driver: WebDriver) -> np.ndarray:
    flat = driver.execute_script(
        "const c = document.getElementById('canvas');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);"
    )
    return np.asarray(flat, dtype=int).reshape(SIZE, SIZE, 4)[..., :3]


def _result(driver: WebDriver) -> np.ndarray:
    source = driver.find_element(By.ID, "result").get_attribute("src")
    prefix = "data:image/png;base64,"
    assert source.startswith(prefix), source[:60]
    image = Image.open(io.BytesIO(base64.b64decode(source[len(prefix):])))
    assert image.size == (SIZE, SIZE)
    return np.asarray(image.convert("RGB")).astype(int)


# Reads the bar inside the page every millisecond: a WebDriver round trip per reading
# would miss the steps of a fast edit (the tiny model steps in milliseconds).
_WATCH_BAR = """
window.__bar = [];
window.__watch = setInterval(() => {
  const value = document.getElementById("progress").value;
  if (window.__bar[window.__bar.length - 1] !== value) window.__bar.push(value);
}, 1);
"""


def _run_edit(driver: WebDriver) -> list[float]:
    """Submit and wait for the result; the progress bar's values on the way."""
    driver.execute_script(_WATCH_BAR)
    driver.find_element(By.ID, "submit").click()
    deadline = time.monotonic() + EDIT_TIMEOUT_S
    while True:
        _, _, shown, status, kind = _progress(driver)
        if shown and kind == "done":
            return driver.execute_script("clearInterval(window.__watch); return window.__bar;")
        assert kind not in ("error", "cancelled"), status
        assert time.monotonic() < deadline, f"no result after {EDIT_TIMEOUT_S:g} s; status {status!r}"


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


# -- the tests ------------------------------------------------------------------------------------
def test_an_uploaded_image_is_painted_edited_and_streamed_step_by_step(page: WebDriver, tmp_path: Path) -> None:
    source = template_image(81)
    path = tmp_path / "source.png"
    path.write_bytes(png(source))
    page.find_element(By.ID, "upload").send_keys(str(path))
    _until(page, lambda: page.find_element(By.ID, "canvas").get_property("width") == SIZE, "the upload is drawn", 10)
    assert np.array_equal(_canvas_pixels(page), _pixels(source))
    _paint(page)

    mask = _mask(page)  # what goes on the wire: opaque (so its colours count), white on the stroke only
    assert mask.size == (SIZE, SIZE) and np.asarray(mask.convert("RGBA"))[..., 3].min() == 255
    region = np.asarray(mask.convert("L")) > 127
    (x0, y), (x1, _) = STROKE
    assert region[y, x0 : x1 + 1].all() and not region[FAR].any()

    _set(page, prompt="a red ball", seed=5, steps=12)
    seen = _run_edit(page)
    total = page.find_element(By.ID, "progress").get_property("max")
    intermediate = sorted({v for v in seen if 0 < v < total})
    assert total == 12 and seen == sorted(seen) and len(intermediate) >= 2, seen
    assert _status(page).startswith("done")

    result = _result(page)
    original = _pixels(source)
    assert np.array_equal(result[FAR], original[FAR])  # untouched far from the stroke
    assert (result[region] != original[region]).any()  # and edited under it
    assert page.find_element(By.ID, "submit").is_enabled() and not page.find_element(By.ID, "cancel").is_enabled()


def test_cancel_stops_the_edit_on_the_instance(page: WebDriver, router: Router, instance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The longest edit the instance takes (16x the tokens of SIZE, the most steps), so that a
    # fast CPU cannot finish it between the first step and the cancel's trip through the
    # browser, the router and the stub (40 steps at SIZE once did, on CI).
    size, steps = 4 * SIZE, EngineLimits.max_steps
    path = tmp_path / "source.png"
    path.write_bytes(png(template_image(83, size)))
    page.find_element(By.ID, "upload").send_keys(str(path))
    _until(page, lambda: page.find_element(By.ID, "canvas").get_property("width") == size, "the upload is drawn", 10)
    _paint(page, size)
    _set(page, prompt="a clock", steps=steps)
    before = metric(metrics(instance.metrics_url), "instgenie_cancellations_total")
    page.find_element(By.ID, "submit").click()

    def stepping() -> bool:
        value, _, _, status, kind = _progress(page)
        assert kind != "error", status
        return value >= 1

    _until(page, stepping, "a first step arrives")
    assert page.find_element(By.ID, "cancel").is_enabled()
    page.find_element(By.ID, "cancel").click()
    _until(page, lambda: _status(page) == "cancelled", "the page says cancelled", 10)
    assert _progress(page)[0] < steps and not page.find_element(By.ID, "result").get_attribute("src")

    def finished() -> bool:
        text = metrics(instance.metrics_url)
        return (not router.pool.instances[0].in_flight and metric(text, "instgenie_active_requests") == 0
                and metric(text, "instgenie_cancellations_total") > before)  # fmt: skip

    _until(page, finished, "the instance cancelled the edit and holds no request", 30)
    assert page.find_element(By.ID, "submit").is_enabled() and not page.find_element(By.ID, "cancel").is_enabled()


def test_a_template_registered_over_grpc_is_listed_drawn_and_edited(page: WebDriver, router: Router) -> None:
    picture = template_image(82)
    template_id = register(f"127.0.0.1:{router.grpc_port}", png(picture), "a room", SEED=3, STEPS=3)
    page.find_element(By.ID, "refresh").click()
    listed = "return Array.from(document.getElementById('templates').options, o => o.value);"  # one read: no stale options
    _until(page, lambda: template_id in page.execute_script(listed), f"{template_id} is listed", 10)

    Select(page.find_element(By.ID, "templates")).select_by_value(template_id)
    _until(page, lambda: template_id in page.find_element(By.ID, "source-info").text, "the template is drawn", 10)
    assert np.array_equal(_canvas_pixels(page), _pixels(picture))

    _paint(page)
    _set(page, prompt="a green lamp", steps=3)
    _run_edit(page)
    assert _status(page).startswith("done")
    assert np.array_equal(_result(page)[FAR], _pixels(picture)[FAR])

    screenshot = os.environ.get("INSTGENIE_SCREENSHOT")
    if screenshot:
        page.save_screenshot(screenshot)
