"""Real-browser checks: headless Chromium (Debian's ``chromium`` and ``chromium-driver``) opens
the evaluation report from disk and the `serve` page, uploads an image, and the test reads the
page state. Screenshots are saved under the test's temporary folder.

When Chromium is missing and we run as root with apt-get (CI's Debian machine), the fixture
installs it (about 30 s measured here); otherwise the tests are skipped with the reason. The
browser is driven by Selenium with the Debian driver given explicitly, so nothing is downloaded
at run time.
"""

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
from PIL import Image

pytestmark = pytest.mark.xdist_group("browser")

CHROMIUM, DRIVER = "chromium", "chromedriver"
PACKAGES = ["chromium", "chromium-driver"]


def _install_chromium() -> None:
    """``apt-get install chromium chromium-driver`` once per machine (a file lock keeps two
    pytest workers from running apt at the same time)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is missing and cannot be installed here (needs root and "
                    "apt-get): apt-get install chromium chromium-driver")
    with open("/tmp/deeplabv2-chromium-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shutil.which(CHROMIUM) and shutil.which(DRIVER):
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode:
                pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        _install_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1800", "--allow-file-access-from-files"):
        options.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch anything
    driver = webdriver.Chrome(options=options, service=Service(shutil.which(DRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, script: str, seconds: float = 60):
    """Poll ``return <script>`` until it is truthy; return its value."""
    deadline = time.monotonic() + seconds
    while True:
        value = driver.execute_script("return " + script)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {script}")
        time.sleep(0.1)


# -- the report ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from deeplabv2 import build_model
    from deeplabv2.app.report import ReportCollector
    from deeplabv2.inference.crf import DenseCRF
    from deeplabv2.data import build_dataset
    from deeplabv2.evaluation.evaluate import evaluate
    out = tmp_path_factory.mktemp("browser_report")
    ds = build_dataset("synthetic", None, "val", num_samples=20, size=[64, 96])
    model = build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                         "num_classes": 7}).eval()
    collector = ReportCollector(out, ds.classes, ds.palette, names=ds.name)
    metrics = evaluate(model, ds, crf=DenseCRF(iterations=2), on_image=collector)
    return collector.write(metrics, title="browser test"), collector


def test_report_opens_from_disk_and_filters_by_class(browser, report, tmp_path):
    page, collector = report
    browser.set_window_size(1400, 4200)  # the whole page in the screenshots
    browser.get(page.as_uri())
    wait_for(browser, "document.body.dataset.ready === '1'")
    worst = browser.execute_script(
        "return Array.from(document.querySelectorAll('#worst .item')).map(e => +e.dataset.score)")
    best = browser.execute_script(
        "return Array.from(document.querySelectorAll('#best .item')).map(e => +e.dataset.score)")
    mious = sorted(e["miou"] for e in collector.images)
    assert worst == pytest.approx(mious[:8]) and best == pytest.approx(mious[::-1][:8])
    # each gallery row: image | ground truth | before CRF | after CRF | error map, all loaded
    first = browser.find_element("css selector", "#worst .item")
    captions = [f.text for f in first.find_elements("css selector", "figcaption")]
    assert captions == ["image", "ground truth", "before CRF", "after CRF", "error map"]
    wait_for(browser, "Array.from(document.querySelectorAll('#worst .item:first-child img'))"
                      ".every(i => i.complete && i.naturalWidth === 96)")
    assert browser.execute_script("return document.querySelectorAll('#image-chart rect')"
                                  ".length") == 20
    browser.save_screenshot(str(tmp_path / "report.png"))

    # filter by a class: only the images holding it, ranked by its IoU
    from selenium.webdriver.support.ui import Select
    c = 0  # road: in every synthetic scene
    Select(browser.find_element("id", "class-filter")).select_by_visible_text("road")
    holding = sorted(e["iou"][c] for e in collector.images if e["iou"][c] is not None)
    wait_for(browser, "document.getElementById('filter-count').textContent.includes('road')")
    scores = browser.execute_script(
        "return Array.from(document.querySelectorAll('#worst .item')).map(e => +e.dataset.score)")
    assert scores == pytest.approx(holding[:8])
    assert "road IoU" in browser.find_element("css selector", "#worst .caption").text
    browser.save_screenshot(str(tmp_path / "report_road.png"))
    # clicking a class's row in the class table does the same (its bar too, which may be
    # zero pixels wide for a random model)
    browser.find_element("css selector", '#class-table tr[data-class="sky"]').click()
    wait_for(browser, "document.getElementById('filter-count').textContent.includes('sky')")
    assert browser.find_element("id", "class-filter").get_attribute("value") == "4"
    assert (tmp_path / "report.png").stat().st_size > 10_000


# -- the app ------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_server(app):
    """uvicorn on 127.0.0.1 and a free port, in a thread; yields the base URL."""
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)


def test_app_upload_shows_overlay_legend_and_refuses_a_non_image(browser, tmp_path):
    from deeplabv2 import build_model, save_weights
    from deeplabv2.app.server import Predictor, create_app
    from deeplabv2.data import SyntheticDataset
    ckpt = tmp_path / "tiny.pth"
    save_weights(build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                              "num_classes": 7}), ckpt, classes=SyntheticDataset.classes,
                 palette=SyntheticDataset.palette)
    image = SyntheticDataset("val", size=(128, 192), num_samples=1).load(0)[0]
    Image.fromarray(image).save(tmp_path / "scene.png")
    (tmp_path / "notes.png").write_text("this is text, not a PNG")
    predictor = Predictor(ckpt, device="cpu")
    with running_server(create_app(predictor)) as url:
        browser.set_window_size(1400, 1000)
        browser.get(url)
        wait_for(browser, "document.getElementById('model-name').textContent.includes('tiny')")
        browser.find_element("id", "file").send_keys(str(tmp_path / "scene.png"))
        wait_for(browser, "document.body.dataset.state === 'done'")
        wait_for(browser, "document.getElementById('overlay').naturalWidth === 192")
        assert browser.execute_script("return document.getElementById('photo').naturalHeight") \
            == 128
        rows = browser.find_elements("css selector", "#legend tr")
        shares = [float(r.find_element("css selector", ".share").text.rstrip("%")) for r in rows]
        assert rows and sum(shares) == pytest.approx(100, abs=0.1 * len(rows))
        assert {r.get_attribute("data-class") for r in rows} <= set(SyntheticDataset.classes)
        assert not browser.find_element("id", "download-ids").is_displayed()  # no Cityscapes
        href = browser.find_element("id", "download-png").get_attribute("href")
        assert href.startswith("data:image/png;base64,")
        # the opacity slider drives the overlay
        browser.execute_script("const s = document.getElementById('opacity'); s.value = 25;"
                               "s.dispatchEvent(new Event('input'));")
        assert browser.execute_script(
            "return document.getElementById('overlay').style.opacity") == "0.25"
        browser.save_screenshot(str(tmp_path / "app.png"))
        # the CRF toggle runs the image again
        browser.find_element("id", "crf").click()
        wait_for(browser, "document.getElementById('timing').textContent.includes('CRF')")
        assert browser.execute_script("return document.body.dataset.state") == "done"
        # a file that is no image: the page says why (415 from the server)
        browser.find_element("id", "file").send_keys(str(tmp_path / "notes.png"))
        wait_for(browser, "document.body.dataset.state === 'error'")
        status = browser.find_element("id", "status").text
        assert "415" in status and "not an image" in status
        browser.save_screenshot(str(tmp_path / "app_error.png"))
    predictor.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
