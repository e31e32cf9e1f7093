"""A real headless Chromium types into the chat page and sees a streamed reply.

Needs Debian's `chromium` package and Playwright's Python package (no `playwright install`: we drive
the system browser). Skipped, saying which is missing, otherwise.
"""
import shutil
from pathlib import Path

import pytest

from tests.helpers_chat import LiveServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_page_streams_a_reply(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="needs Playwright's Python package: pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    server = LiveServer(slots=4, default_max_tokens=40)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#input", "Hello, who are you?")
            page.click("#send")
            page.wait_for_selector(".msg.user")
            # the reply bubble fills in while streaming; Send comes back once the stream is done
            page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 0", timeout=30_000)
            page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
            reply = page.text_content(".msg.assistant")
            assert reply and "[error" not in reply
            assert page.text_content(".msg.user") == "Hello, who are you?"
            # a second turn: the conversation grows to two exchanges
            page.fill("#input", "And then?")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2")
            page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
            assert "[error" not in page.locator(".msg.assistant").nth(1).text_content()
            shot = tmp_path / "web_screenshot.png"
            page.screenshot(path=str(shot))
            shutil.copy(shot, "/tmp/web_screenshot.png")
            page.click("#new-chat")
            assert page.locator(".msg").count() == 0
            browser.close()
    finally:
        server.close()


def test_page_asks_once_for_the_api_key():
    """A server started with an API key answers the page 401: the page asks for the key (a prompt
    dialog), resends, and keeps the key for the next message."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="needs Playwright's Python package: pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    server = LiveServer(slots=2, default_max_tokens=8, app={"api_key": "sekret"})
    server.worker.engine.tools.stop_ids = set()  # no empty reply (an end-of-turn token first)
    dialogs = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.accept("sekret")))
            page.goto(server.url + "/")
            for turn, text in enumerate(["Hello, who are you?", "And then?"], start=1):
                page.fill("#input", text)
                page.click("#send")
                page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length == {turn}")
                page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
                reply = page.locator(".msg.assistant").nth(turn - 1).text_content()
                assert reply and "[error" not in reply, reply
            assert dialogs == ["This server needs an API key:"]
            browser.close()
    finally:
        server.close()
