"""The dashboard in a real headless browser: Debian's chromium driven by
Playwright (``executable_path``: Playwright's own browser download cannot
work here), against `chaperone serve` as a real process.  One browser for
the session; a fresh context (cookies) per test."""

import os
import shutil
import time

import pytest

from support.servehelpers import Server, kill_runs, wait_for

CHROMIUM = os.environ.get("CHAPERONE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    # (module, not session: Playwright's sync API keeps an event loop running
    # in this thread while it is open, and later tests call asyncio.run)
    sync_api = pytest.importorskip("playwright.sync_api")
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        if os.environ.get("CHAPERONE_REQUIRE_SSHD") == "1":  # (CI installs chromium: .ci/run)
            pytest.fail("no chromium at %s" % CHROMIUM, pytrace=False)
        pytest.skip("no chromium at %s (apt-get install chromium)" % CHROMIUM)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-browser") / "home").start()
    try:
        yield s
    finally:
        s.stop()
        kill_runs(s.home)


@pytest.fixture(autouse=True)
def _close_contexts(browser):
    yield
    for context in list(browser.contexts):
        context.close()


def open_page(browser, server, path="#/"):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: d.accept())
    page.goto(server.sign_in_url)  # -> the cookie, then a redirect to the clean URL
    assert page.url == server.url
    if path != "#/":
        page.goto(server.url + path)
    page.wait_for_selector('#conn[data-state="live"]', timeout=10000)
    page.evaluate("window.__sameDocument = 1")  # (gone if the page ever reloads)
    page.errors = errors
    return page


def row(page, rid):
    return page.locator('#runs tbody tr[data-id="%s"]' % rid)


def pane_text(page, stream="stdout"):
    return page.locator('.pane[data-stream="%s"] pre' % stream).text_content()


def test_a_new_run_shows_within_a_second_and_its_state_changes_live(browser, server):
    page = open_page(browser, server)
    gate = server.home / ("gate-%d" % time.monotonic_ns())
    c = server.client
    t0 = time.monotonic()
    rid = c.start("local", command="echo hi; while [ ! -e %s ]; do sleep 0.05; done; exit 7" % gate)["id"]
    row(page, rid).wait_for(timeout=1000)
    assert time.monotonic() - t0 < 1.5  # (1 s after the start answered; the start itself is ~0.1 s)
    page.wait_for_selector('#runs tr[data-id="%s"][data-state="running"]' % rid, timeout=5000)
    assert "local" in row(page, rid).locator("td.host").text_content()
    gate.touch()
    page.wait_for_selector('#runs tr[data-id="%s"][data-state="done"]' % rid, timeout=10000)
    assert row(page, rid).locator("td.end").text_content() == "exit 7"
    assert page.evaluate("window.__sameDocument") == 1  # no reload
    # A filter is a shareable link.
    page.select_option("#f-state", "running")
    assert "state=running" in page.url
    assert row(page, rid).is_hidden()
    page2 = open_page(browser, server, page.url.split("/", 3)[3])
    assert page2.locator("#f-state").input_value() == "running" and row(page2, rid).is_hidden()
    assert not page.errors and not page2.errors


def test_output_appears_as_written(browser, server):
    gate = server.home / ("gate-%d" % time.monotonic_ns())
    rid = server.client.start("local", command="printf 'first\\n'; while [ ! -e %s ]; do sleep 0.05; done;"
                                               " printf 'second\\n'; printf 'oops\\n' >&2" % gate)["id"]
    page = open_page(browser, server, "#/run/" + rid)
    wait_for(lambda: pane_text(page) == "first\n", 5, "the first line")
    time.sleep(0.3)
    assert pane_text(page) == "first\n"
    gate.touch()
    wait_for(lambda: pane_text(page) == "first\nsecond\n", 5, "the second line")
    wait_for(lambda: pane_text(page, "stderr") == "oops\n", 5, "stderr")
    page.wait_for_selector('.pane[data-stream="stdout"][data-ended="1"]', timeout=5000)
    assert page.locator("#kill-box").is_hidden()
    assert not page.errors


def test_kill_from_the_page(browser, server):
    rid = server.client.start("local", command="echo ready; exec sleep 60")["id"]
    page = open_page(browser, server, "#/run/" + rid)
    wait_for(lambda: pane_text(page) == "ready\n", 5, "output")
    page.select_option("#kill-signal", "INT")
    page.click("#kill")  # (the confirm dialog is accepted)
    page.wait_for_selector('#rv-meta dd[data-key="ended"]', timeout=10000)
    assert page.locator('#rv-meta dd[data-key="ended"]').text_content() == "SIGINT (130)"
    assert page.locator('#rv-meta dd[data-key="state"]').text_content() == "done"
    assert server.client.run(rid)["signal"] == "SIGINT"
    page.click("#back")
    assert row(page, rid).locator("td.end").text_content() == "SIGINT (130)"
    assert not page.errors


HOSTILE = r"""
import sys
o = sys.stdout.buffer
o.write(b"<script>window.__pwned = 1</script>\n<img src=x onerror='window.__pwned = 2'>\n")
o.write(b"bad utf-8: \xff\xfe\xc3(\n")
o.write(b"controls: \x1b[31mred\x1b[0m bell\x07 nul\x00 del\x7f bidi\xe2\x80\xae12345\n")
o.write(b"A" * (10 * 1000 * 1000) + b"\n")
o.write(b"after the long line\n")
"""


def test_hostile_output_and_argv_render_as_text(browser, server):
    c = server.client
    rid = c.start("local", ["python3", "-c", HOSTILE, "<img src=y onerror='window.__pwned = 3'>"])["id"]
    c.wait(rid, timeout=30)
    page = open_page(browser, server, "#/run/" + rid)
    t0 = time.monotonic()
    page.wait_for_selector('.pane[data-stream="stdout"][data-ended="1"]', timeout=30000)
    took = time.monotonic() - t0
    text = pane_text(page)
    assert text.startswith("<script>window.__pwned = 1</script>\n<img src=x onerror='window.__pwned = 2'>\n")
    assert "bad utf-8: \ufffd\ufffd\ufffd(\n" in text
    assert "controls: \u241b[31mred\u241b[0m bell\u2407 nul\u2400 del\u2421 bidi<U+202E>12345\n" in text
    assert "A" * 4000 + " \u2026 [line longer than 4000 characters" in text and "A" * 4001 not in text
    assert text.endswith("after the long line\n")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main script, main img, pre *").count() == 0
    assert page.locator('.pane[data-stream="stdout"] .pane-info').text_content() == "10 MB, complete"
    assert "long line" in page.locator('.pane[data-stream="stdout"] .pane-note').text_content()
    # Still responsive: a round trip through the page's event loop.
    t1 = time.monotonic()
    page.evaluate("new Promise(r => setTimeout(r, 0))")
    assert time.monotonic() - t1 < 1.0
    assert took < 20, took
    assert "onerror='window.__pwned = 3'" in page.locator('#rv-meta dd[data-key="argv"]').text_content()
    page.click("#back")
    assert "<img src=y" in row(page, rid).locator("td.cmd").text_content()
    assert page.evaluate("window.__pwned") is None and not page.errors
    # The raw bytes link gives the exact bytes.
    href = page.locator('.pane[data-stream="stdout"] a.raw').get_attribute("href")
    assert href == "/api/runs/%s/output?stream=stdout" % rid


def test_the_page_reconnects_after_the_server_is_killed_and_restarted(browser, tmp_path):
    server = Server(tmp_path / "home").start()
    try:
        gate = tmp_path / "gate"
        c = server.client
        # 40 lines, then waits for the gate, then 40 more: the view follows it across the restart.
        rid = c.start("local", command="i=0; while [ $i -lt 40 ]; do echo line $i; i=$((i+1)); done;"
                                       " while [ ! -e %s ]; do sleep 0.05; done;"
                                       " while [ $i -lt 80 ]; do echo line $i; i=$((i+1)); done" % gate)["id"]
        page = open_page(browser, server, "#/run/" + rid)
        first = "".join("line %d\n" % i for i in range(40))
        wait_for(lambda: pane_text(page) == first, 5, "the first 40 lines")
        server.kill()
        page.wait_for_selector('#conn[data-state="reconnecting"]', timeout=10000)
        gate.touch()  # the run goes on while the server is down
        time.sleep(1.0)
        server.start()
        page.wait_for_selector('#conn[data-state="live"]', timeout=15000)
        everything = "".join("line %d\n" % i for i in range(80))
        wait_for(lambda: pane_text(page) == everything, 20, "the rest, once")
        page.wait_for_selector('.pane[data-stream="stdout"][data-ended="1"]', timeout=10000)
        assert pane_text(page) == everything
        # The run list is live again too.
        new = server.client.start("local", ["true"])["id"]
        page.click("#back")
        row(page, new).wait_for(timeout=5000)
        page.wait_for_selector('#runs tr[data-id="%s"][data-state="done"]' % rid, timeout=10000)
        assert page.evaluate("window.__sameDocument") == 1 and not page.errors
    finally:
        server.kill()
        kill_runs(tmp_path)
