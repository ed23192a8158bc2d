"""The dashboard in a real browser: Debian's headless Chromium driven by
selenium (skipped when either is missing).  The page loads, shows the
nodes and jobs of a running cluster, and updates as jobs finish."""
import os
import pathlib
import shutil
import tempfile

import pytest

import dpool
from helpers import poll_for
from tasks import hold

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="needs Debian's chromium and chromium-driver"),
]
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dpool-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def text_of(driver, css):
    """The text of the elements matching ``css``, read in one go (the page
    redraws itself every poll, so element handles go stale)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText)", css)


def count(driver, status):
    values = text_of(driver, f'[data-count="{status}"] b')
    return int(values[0]) if values else None


def test_page_shows_nodes_and_jobs_and_updates(browser, tmp_path):
    from dpool.httpd import DispyHTTPServer

    gates = [tmp_path / f"gate{n}" for n in range(4)]
    statuses = []  # a callback makes the nodes report when jobs start
    with dpool.JobCluster(hold, cpus=2, job_status=statuses.append) as cluster:
        http_server = DispyHTTPServer(cluster, port=0, poll_sec=1)
        try:
            jobs = [cluster.submit(str(tmp_path / f"m{n}"), str(gates[n])) for n in range(4)]
            browser.get(http_server.url)
            assert browser.title == "dpool dashboard"
            # the node and the two running jobs (two more queued) appear
            poll_for(lambda: count(browser, "running") == 2, 20, message="2 running on the page")
            assert count(browser, "queued") == 2 and count(browser, "finished") == 0
            (row,) = text_of(browser, "tr.node")
            name, address, state, cpus, running = row.split("\t")[:5]
            assert (address, state, cpus, running) == ("embedded", "up", "2", "2")
            # jobs finish: the page follows
            for gate in gates[:3]:
                gate.touch()
            poll_for(lambda: count(browser, "finished") == 3, 20, message="3 finished")
            assert count(browser, "running") == 1
            poll_for(lambda: len(text_of(browser, "tr.job")) == 3, 10, message="3 recent jobs")
            gates[3].touch()
            failed = cluster.submit("/nonexistent/dir/m", None)  # hold() fails to write
            poll_for(lambda: count(browser, "failed") == 1, 20, message="the failure")
            poll_for(lambda: text_of(browser, ".errors li"), 10, message="the error text")
            assert "FileNotFoundError" in text_of(browser, ".errors li")[0]
            assert [job() for job in jobs] and failed.status == dpool.DispyJob.Terminated
            poll_for(lambda: count(browser, "finished") == 4, 20, message="4 finished")
            browser.save_screenshot(str(tmp_path / "dashboard.png"))
            if os.environ.get("DPOOL_SCREENSHOT"):  # refresh the one in docs/
                shutil.copy(tmp_path / "dashboard.png", DOCS / "dashboard.png")
        finally:
            http_server.shutdown(wait=False)


def test_the_page_needs_its_token(browser):
    board = dpool.dashboard.serve(host="0.0.0.0")
    try:
        browser.get(f"http://127.0.0.1:{board.port}/")
        assert "403" in browser.page_source
        browser.get(board.url.replace("0.0.0.0", "127.0.0.1"))
        poll_for(lambda: "nothing to show yet" in browser.page_source, 10, message="the page")
    finally:
        board.shutdown()
