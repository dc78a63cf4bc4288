"""The report, the comparison and the search page in a real browser (headless Chromium driven by
Selenium): what a person sees, the counts, the sorted order, the images loaded, a typed query and its
results, a query holding <script> shown as text. Each page is saved as a screenshot in the test's
tmp dir.

Without Chromium, chromedriver or selenium these tests skip with one line, except under CI (env CI
set), where they fail: `make test` installs them (apt-get as root, selenium from requirements.txt)."""
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

from entityclip_jax.cli import main as cli
from entityclip_jax.eval.retrieval_details import load_results
from tests._child_process import child_env
from tests._tiny_training import write_tiny_records

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000")


def _browser_parts():
    """(chromium, chromedriver, selenium's webdriver module or None), each None when missing."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    return chromium, shutil.which("chromedriver"), webdriver


MISSING = [name for name, part in zip(("chromium", "chromedriver", "selenium"), _browser_parts()) if not part]
WHY = (f"no {', '.join(MISSING)}: the browser tests need `apt-get install chromium chromium-driver` and "
       "`pip install selenium` (make test does both)")
if MISSING and not os.environ.get("CI"):
    pytest.skip(WHY, allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    if MISSING:   # only under CI: there the browser tests must run
        pytest.fail(WHY + "; under CI they must run")
    chromium, driver_path, webdriver = _browser_parts()
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="chromium-profile-")   # a fresh profile: nothing remembered between runs
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Tiny records; A: a one-step EntityCLIP run (it has explanation experts), B: random towers;
    `eval --report` of both on the val split, `compare A B`, and a search index of val built by A."""
    import dataclasses

    import jax

    from entityclip_jax.checkpoints.towers import save_towers
    from entityclip_jax.config import load_config
    from entityclip_jax.models.clip import init_params
    from entityclip_jax.models.clip_config import PRESETS
    from entityclip_jax.train import loop

    root = tmp_path_factory.mktemp("pages")
    records, vocab, eos = write_tiny_records(root, num_train=16, num_val=40)
    overrides = {"data.dir": records, "model.vocab_size": vocab, "model.eos_token_id": eos, "num_train_steps": 1,
                 "batch_size": 8, "optimizer.warmup_steps": 0, "eval.every_steps": 0, "checkpoint.every_steps": 1}
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_cpu.py"),
                         [f"--config.{key}={value}" for key, value in overrides.items()])
    loop.train(config, str(root / "entityclip"))
    tiny = PRESETS["tiny"]
    towers = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, vocab_size=vocab, eos_token_id=eos))
    save_towers(init_params(towers, jax.random.key(7)), towers, root / "random_towers")
    for name, checkpoint in (("entityclip", root / "entityclip"), ("random", root / "random_towers")):
        assert cli(["eval", "--checkpoint", str(checkpoint), "--data", records, "--split", "val",
                    "--out", str(root / "results" / name), "--report"]) == 0
    assert cli(["compare", str(root / "results" / "entityclip"), str(root / "results" / "random"),
                "--out", str(root / "compare.html")]) == 0
    assert cli(["search-index", "--checkpoint", str(root / "entityclip"), "--records", records, "--split", "val",
                "--out", str(root / "index.npz")]) == 0
    return root


def screenshot(driver, tmp_path, name):
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    return path


def wait_for(driver, script, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


def all_images_loaded(driver):
    return wait_for(driver, "const images = Array.from(document.images);"
                            "return images.length > 0 && images.every(i => i.complete) && images;") and \
        driver.execute_script("return Array.from(document.images).every(i => i.naturalWidth > 0)")


def visible_rows(section, attribute):
    """The data-<attribute> of the section's visible query rows, top to bottom."""
    from selenium.webdriver.common.by import By
    return [int(row.get_attribute(f"data-{attribute}"))
            for row in section.find_elements(By.CSS_SELECTOR, "table.query-rows > tbody > tr") if row.is_displayed()]


def test_report_shows_every_query_sorted_and_filtered_by_rank(browser, site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    metrics, details = load_results(site / "results" / "entityclip")
    browser.get((site / "results" / "entityclip" / "report.html").as_uri())
    assert "entityclip" in browser.title and "val of records" in browser.title
    rows = browser.find_elements(By.CSS_SELECTOR, "table.metrics tbody tr")
    assert rows[1].text.split()[3] == f"{metrics['t2i']['R@1']:.2f}"     # "text -> image R@1 ..."
    assert all_images_loaded(browser)
    assert browser.execute_script("return document.getElementById('curve').naturalWidth") > 200
    assert not browser.execute_script("return Array.from(document.querySelectorAll('img')).some("
                                      "i => /^https?:/.test(i.src))")               # nothing from a network

    t2i = browser.find_element(By.ID, "t2i")
    ranks = np.asarray(details.direction("t2i")["ranks"]) + 1
    assert visible_rows(t2i, "rank") == sorted(ranks)                               # best first by default
    assert t2i.find_element(By.CLASS_NAME, "shown").text == str(len(ranks))
    for row in t2i.find_elements(By.CSS_SELECTOR, "table.query-rows > tbody > tr"):   # the truth framed at its rank
        rank = int(row.get_attribute("data-rank"))
        hits = row.find_elements(By.CSS_SELECTOR, ".hit")
        assert [n + 1 for n, hit in enumerate(hits) if "correct" in hit.get_attribute("class")] == \
            ([rank] if rank <= 5 else [])

    t2i.find_element(By.CLASS_NAME, "min-rank").send_keys("2")
    t2i.find_element(By.CLASS_NAME, "max-rank").send_keys("9")
    Select(t2i.find_element(By.CLASS_NAME, "sort")).select_by_value("rank:desc")
    wanted = sorted(ranks[(ranks >= 2) & (ranks <= 9)], reverse=True)
    assert visible_rows(t2i, "rank") == wanted
    assert t2i.find_element(By.CLASS_NAME, "shown").text == str(len(wanted))
    screenshot(browser, tmp_path, "report")


def test_comparison_counts_and_sorts_by_the_change(browser, site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _, a = load_results(site / "results" / "entityclip")
    _, b = load_results(site / "results" / "random")
    browser.get((site / "compare.html").as_uri())
    assert "entityclip vs random" in browser.title
    assert all_images_loaded(browser)
    for direction in ("t2i", "i2t"):
        ranks_a, ranks_b = a.direction(direction)["ranks"], b.direction(direction)["ranks"]
        section = browser.find_element(By.ID, direction)
        count = {cell.get_attribute("data-count"): int(cell.text)
                 for cell in section.find_elements(By.CSS_SELECTOR, "[data-count]")}
        assert count == {"fixed": int(((ranks_a == 0) & (ranks_b > 0)).sum()),
                         "broken": int(((ranks_a > 0) & (ranks_b == 0)).sum()),
                         "better": int((ranks_a < ranks_b).sum()), "worse": int((ranks_a > ranks_b).sum()),
                         "same": int((ranks_a == ranks_b).sum()), "total": 40}
        assert visible_rows(section, "change") == sorted(ranks_b - ranks_a, reverse=True)
        Select(section.find_element(By.CLASS_NAME, "kind")).select_by_value("worse")
        assert len(visible_rows(section, "change")) == count["worse"] - count["broken"]   # broken ones: "broken"
        assert all(change < 0 for change in visible_rows(section, "change"))
        Select(section.find_element(By.CLASS_NAME, "kind")).select_by_value("all")
    screenshot(browser, tmp_path, "compare")


@pytest.fixture
def server(site):
    """`entityclip serve` on the index, in its own process, on a free loopback port."""
    command = [sys.executable, "-m", "entityclip_jax.cli", "serve", "--index", str(site / "index.npz"),
               "--checkpoint", str(site / "entityclip"), "--tokenizer", str(site / "tokenizer"), "--port", "0"]
    env = child_env()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    output = []
    while True:
        try:
            output.append(lines.get(timeout=180))
        except queue.Empty:
            process.kill()
            pytest.fail("serve did not start in 180 s:\n" + "".join(output))
        found = re.search(r"on (http://127\.0\.0\.1:\d+/)", output[-1])
        if found:
            break
    yield found.group(1), process, lines, output
    if process.poll() is None:
        process.kill()


def test_search_page_answers_typed_queries_and_stops_on_sigterm(browser, site, server, tmp_path, capsys):
    from selenium.webdriver.common.by import By

    base, process, lines, output = server
    query = [json.loads(line) for line in open(site / "raw" / "val.jsonl")][3]["query"]
    assert cli(["search", "--checkpoint", str(site / "entityclip"), "--index", str(site / "index.npz"),
                "--tokenizer", str(site / "tokenizer"), "--query", query, "-k", "5"]) == 0
    expected = re.findall(r"^\s+\d+\. \S+\s+(\S+)$", capsys.readouterr().out, re.MULTILINE)

    browser.get(base)
    box = browser.find_element(By.NAME, "q")
    box.send_keys(query)
    browser.find_element(By.NAME, "k").clear()
    browser.find_element(By.NAME, "k").send_keys("5")
    box.submit()
    wait_for(browser, "return document.getElementById('results-title')")
    shown = [a.get_attribute("href").split("id=")[1].split("&")[0]
             for a in browser.find_elements(By.CSS_SELECTOR, ".result a")]
    assert shown == expected and len(shown) == 5          # what `entityclip search` finds, in its order
    assert query in browser.find_element(By.ID, "results-title").text
    assert all_images_loaded(browser)
    screenshot(browser, tmp_path, "search")

    browser.find_element(By.CSS_SELECTOR, ".result a").click()          # the best hit: its captions, attention
    wait_for(browser, "return document.getElementById('captions')")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#captions li")) == 10
    explanation = {row["id"]: row["explanation"].lower() for row in map(json.loads, open(site / "raw" / "val.jsonl"))}
    experts = browser.find_elements(By.CSS_SELECTOR, "#attention > div")
    assert len(experts) == 2                                            # tiny_cpu.py: 2 explanation experts
    words = [cell.text for cell in experts[0].find_elements(By.CSS_SELECTOR, "tr td:first-child") if cell.text]
    assert words and all(word.lower() in explanation[expected[0]] for word in words)
    assert all_images_loaded(browser)
    screenshot(browser, tmp_path, "image")

    browser.get(base)
    box = browser.find_element(By.NAME, "q")
    box.send_keys("<script>window.pwned = 1</script> tower")
    box.submit()
    wait_for(browser, "return document.getElementById('results-title')")
    assert "<script>window.pwned = 1</script> tower" in browser.find_element(By.ID, "results-title").text
    assert browser.execute_script("return window.pwned === undefined")
    for url, words in [(base + "?q=+", "type a query"), (base + "?q=" + "x" * 2000, "at most"),
                       (base + "image?id=%3Cnope%3E", "no image with id '<nope>'"), (base + "?q=a&k=-1", "from 1 to")]:
        browser.get(url)
        assert words in wait_for(browser, "const m = document.getElementById('message'); return m && m.textContent")

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert "stopped" in "".join(output + rest)
    assert "Traceback" not in "".join(output + rest)
