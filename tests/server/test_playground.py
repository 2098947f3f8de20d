"""The playground (server/playground.py, server/static/): its routes, headers and the
API-key exemption in-process; then the page itself in a real headless Chromium
(Debian's chromium and chromium-driver, driven by Selenium, which is pointed at
the installed driver and never downloads one) against a real `pyforge serve`:
a streamed chat kept across turns, its stats, a JSON schema and the 400 of a bad
one, the stop button, and a server with an API key.

Without chromium, chromedriver or selenium the browser tests skip with the
reason, unless PYFORGE_REQUIRE_REFERENCES=1 (CI): then they fail. Each browser
test saves a screenshot under its tmp_path."""
import json
import os
import re
import shutil
from html.parser import HTMLParser
from importlib import resources

import pytest
from falcon import testing

from conftest import STORIES, require_module
from live_server import Server
from pyforge.config import ServerConfig
from pyforge.engine.engine import Engine
from pyforge.server import playground
from pyforge.server.app import create_app
from pyforge.server.inprocess import InProcessEngineClient

KEY = "sk-playground"
MODEL = "stories260K"
SYSTEM = "You tell short stories."
DEADLINE = 120          # seconds a browser wait may take on a loaded machine (it polls; a pass returns at once)
STATS = re.compile(r"(\d+) tokens in [\d.]+ s: [\d.]+ tokens/s · first token after \d+ ms · "
                   r"(\d+) of (\d+) prompt tokens cached")

IDLE_AFTER_EACH_TEST = ("served",)


# -- in-process: routes, headers, auth ------------------------------------------------------------

@pytest.fixture(scope="module")
def served():
    engine = Engine(STORIES, n_threads=1, max_model_len=256, kv_cache_tokens=4096)
    client = InProcessEngineClient(engine, queue_capacity=4)
    yield None, engine, client          # (app, engine, ...) as IDLE_AFTER_EACH_TEST reads it
    client.close()


def app_with(served, **config):
    _, engine, client = served
    return testing.TestClient(create_app(ServerConfig(model=STORIES, **config), client, engine.tokenizer))


def static_file(name):
    return (resources.files("pyforge.server") / "static" / name).read_bytes()


def test_the_page_and_its_files_are_served_with_a_strict_policy(served):
    app = app_with(served)
    for path, (name, content_type) in playground.FILES.items():
        r = app.simulate_get(path)
        assert r.status_code == 200 and r.content == static_file(name), path
        assert r.headers["Content-Type"] == content_type
        assert r.headers["Content-Security-Policy"] == playground.CSP
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    # nothing but this server's own files: no other host, no inline code, no eval
    assert "default-src 'none'" in playground.CSP and "unsafe" not in playground.CSP and "://" not in playground.CSP


def test_the_playground_can_be_turned_off(served):
    app = app_with(served, playground=False)
    for path in playground.FILES:
        assert app.simulate_get(path).status_code == 404, path
    assert app.simulate_get("/v1/models").status_code == 200


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.inline = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[a] for a in ("src", "href") if a in attrs]
        if tag == "style" or (tag == "script" and "src" not in attrs) or "style" in attrs:
            self.inline.append(tag)
        self.inline += [f"{tag}.{a}" for a in attrs if a.startswith("on")]


def test_the_page_loads_only_files_the_server_serves():
    """Nothing from a CDN, no inline script or style (the policy would block them)."""
    page = _Links()
    page.feed(static_file("playground.html").decode())
    assert sorted(page.links) == sorted(p for p in playground.FILES if p != "/")
    assert page.inline == []


def test_with_an_api_key_only_the_page_paths_are_open(served):
    app = app_with(served, api_key=(KEY,))
    for path in playground.FILES:
        assert app.simulate_get(path).status_code == 200, path
    # "/" opens that exact path, not every path below it
    for path in ("/v1/models", "/static/other.js", "/static", "/api/llms", "/static/playground.js/x"):
        r = app.simulate_get(path)
        assert r.status_code == 401 and json.loads(r.content)["error"]["code"] == "invalid_api_key", path
    assert app.simulate_get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# -- the page in headless Chromium ----------------------------------------------------------------

@pytest.fixture(scope="module")
def webdriver():
    """selenium.webdriver, where chromium and its driver are installed (else skip, or fail in CI)."""
    webdriver = require_module("selenium.webdriver")
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        why = f"{' and '.join(missing)} not on PATH (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("PYFORGE_REQUIRE_REFERENCES") == "1":
            pytest.fail(f"{why}; the browser test is required (PYFORGE_REQUIRE_REFERENCES=1)")
        pytest.skip(why)
    return webdriver


@pytest.fixture
def browser(webdriver):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # a driver path given: Selenium Manager is skipped, nothing is downloaded
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(webdriver):
    """A server without keys (after the check for a browser: no server starts for a skip)."""
    server = Server(STORIES, "--chat-template", "chatml", workers=1)
    yield server
    server.stop()


def until(driver, condition, what):
    """Poll `condition(driver)` until it is truthy (its value returned); fail after DEADLINE."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, DEADLINE, poll_frequency=0.05).until(condition)
    except TimeoutException:
        pytest.fail(f"the page never showed {what}; error box: {text(driver, '#error')!r}, "
                    f"console: {driver.get_log('browser')}")


def text(driver, selector):
    """The exact textContent of the first element matching `selector` (Selenium's .text trims)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e && e.textContent",
                                 selector)


def answers(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('.message.assistant .content')].map(e => e.textContent)")


def fill(driver, element_id, value):
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def open_page(driver, server):
    from selenium.webdriver.support.ui import Select
    driver.get(server.url + "/")
    until(driver, lambda d: Select(d.find_element("id", "model")).options, "the model list")
    Select(driver.find_element("id", "model")).select_by_visible_text(MODEL)


def send(driver, message):
    from selenium.webdriver.common.keys import Keys
    fill(driver, "input", message)
    driver.find_element("id", "input").send_keys(Keys.ENTER)


def wait_answer(driver, n):
    """The stats line once the n-th answer has ended (its text streamed in before it)."""
    until(driver, lambda d: len(answers(d)) == n and STATS.search(text(d, "#stats")), f"answer {n} and its stats")
    return STATS.search(text(driver, "#stats"))


def console_errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver, path):
    driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, len(data)


def reference(server, messages, **fields):
    return server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **fields)


def test_a_streamed_chat_keeps_the_conversation_and_shows_its_speed(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    open_page(browser, server)
    fill(browser, "system", SYSTEM)
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "24")
    # Shift+Enter is a new line, not a send
    fill(browser, "input", "Once upon a time")
    box = browser.find_element("id", "input")
    ActionChains(browser).click(box).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT) \
        .send_keys("there was a cat").perform()
    assert browser.execute_script("return document.getElementById('input').value") == \
        "Once upon a time\nthere was a cat" and answers(browser) == []
    box.send_keys(Keys.ENTER)
    first = "Once upon a time\nthere was a cat"
    stats = wait_answer(browser, 1)
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first}]
    expected = reference(server, history, max_tokens=24)
    assert answers(browser) == [expected.choices[0].message.content]
    assert (int(stats[1]), int(stats[3])) == (expected.usage.completion_tokens, expected.usage.prompt_tokens)

    # the second turn sends the first (its prompt starts with the first's: cached)
    send(browser, "Then what?")
    stats = wait_answer(browser, 2)
    history += [{"role": "assistant", "content": answers(browser)[0]}, {"role": "user", "content": "Then what?"}]
    expected = reference(server, history, max_tokens=24)
    assert answers(browser)[1] == expected.choices[0].message.content
    assert int(stats[3]) == expected.usage.prompt_tokens and 0 < int(stats[2]) < int(stats[3])
    assert text(browser, "#error") == "" and browser.find_element("id", "input").get_attribute("value") == ""
    assert console_errors(browser) == []
    screenshot(browser, tmp_path / "playground.png")


def test_a_json_schema_constrains_the_answer_and_a_bad_one_shows_the_400(server, browser, tmp_path):
    open_page(browser, server)
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "64")
    fill(browser, "schema", json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                        "required": ["ok"], "additionalProperties": False}))
    send(browser, "Answer in JSON.")
    wait_answer(browser, 1)
    assert isinstance(json.loads(answers(browser)[0])["ok"], bool)

    fill(browser, "schema", '{"type": "object", "properties": {"n": {"type": "integr"}}}')
    send(browser, "Again.")
    error = until(browser, lambda d: text(d, "#error"), "the 400 error")
    assert error.startswith("Error 400:") and "response_format" in error, error
    # the failed message goes back to the input, and the conversation holds only the first turn
    assert browser.find_element("id", "input").get_attribute("value") == "Again."
    assert len(answers(browser)) == 1 and len(browser.find_elements("css selector", ".message.user")) == 1

    fill(browser, "schema", '{"type": ')
    browser.find_element("id", "send").click()
    until(browser, lambda d: "The JSON schema is not JSON" in text(d, "#error"), "the schema's JSON error")
    # the 400's answer is the one error the console reports (Chromium logs a failed fetch)
    assert all("400" in entry["message"] for entry in console_errors(browser)), console_errors(browser)
    screenshot(browser, tmp_path / "playground-error.png")


def test_stop_ends_an_answer_midway_and_keeps_it(server, browser, tmp_path):
    open_page(browser, server)
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "1500")
    # the stream trickles in (DevTools throttling): the answer is surely unfinished when stopped
    browser.set_network_conditions(latency=0, download_throughput=4000, upload_throughput=1_000_000)
    fill(browser, "schema", json.dumps({"type": "string", "minLength": 1000}))
    send(browser, "Tell a long story.")
    until(browser, lambda d: (answers(d) or [""])[0].strip('"'), "the start of the answer")
    assert not browser.find_element("id", "stop").get_attribute("disabled")
    browser.find_element("id", "stop").click()
    until(browser, lambda d: text(d, "#stats") == "Stopped.", "the stop")
    partial = answers(browser)[0]
    assert 0 < len(partial) < 1000 and text(browser, "#error") == ""
    assert browser.find_element("id", "stop").get_attribute("disabled") == "true"
    assert browser.find_element("id", "send").get_attribute("disabled") is None
    assert console_errors(browser) == []
    screenshot(browser, tmp_path / "playground-stopped.png")


def test_with_an_api_key_the_page_loads_and_asks_for_it(browser, tmp_path):
    server = Server(STORIES, "--chat-template", "chatml", "--api-key", KEY, workers=1)
    try:
        browser.get(server.url + "/")
        error = until(browser, lambda d: text(d, "#error"), "the models' 401")
        assert "Error 401: invalid_api_key" in error, error
        send(browser, "Once upon a time")
        until(browser, lambda d: text(d, "#error").startswith("Error 401: invalid_api_key"), "the chat's 401")
        assert browser.find_element("id", "input").get_attribute("value") == "Once upon a time"

        fill(browser, "api-key", KEY)
        browser.find_element("id", "input").click()         # leaving the field saves the key and lists the models
        until(browser, lambda d: text(d, "#model") == MODEL and text(d, "#error") == "", "the models with the key")
        browser.find_element("id", "send").click()
        wait_answer(browser, 1)
        assert answers(browser)[0]
        assert browser.execute_script("return localStorage.getItem('pyforge.apiKey')") == KEY
        assert all("401" in entry["message"] for entry in console_errors(browser))

        browser.refresh()                                   # the key is remembered
        until(browser, lambda d: text(d, "#model") == MODEL, "the models with the remembered key")
        assert browser.find_element("id", "api-key").get_attribute("value") == KEY and text(browser, "#error") == ""
        screenshot(browser, tmp_path / "playground-key.png")
    finally:
        server.stop()
