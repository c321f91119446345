"""The playground page (`GET /playground`): its HTTP surface, and the page itself driven in Chromium.

Browser tests run the system Chromium through Playwright and skip only where no Chromium is found. Captions on
the page are compared with what the API returns for the same image and levels (greedy, so deterministic),
object-word marks with the CHAIR scorer's reading of the same captions.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect

from bench.chair import caption_objects
from server.playground.vocabulary import surface_forms
from server.schemas.caption import DEFAULT_PROMPT
from tests.server.browser import (
    ARTIFACTS,
    choose_sample,
    chromium,
    column_captions,
    column_facts,
    comparison,
    find_chromium,
    open_playground,
    screenshot,
)
from tests.support.images import long_png, png_bytes
from tests.support.live_server import LiveServer, base_settings
from tests.support.waiting import eventually
from training.scenes import make_scene

pytestmark = pytest.mark.integration  # every test here starts servers; the browser ones Chromium too

LEVELS = (0.0, 0.5, 1.0)
MAX_TOKENS = 12
API_KEY = "playground-test-key"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            "no Chromium found for the playground's browser tests: `apt-get install chromium` "
            "(what `make install-browser` runs as root), or point SEVI_CHROMIUM at a Chrome binary"
        )
    with chromium(executable) as launched:
        yield launched


class Session:
    """One browser context (a fresh tab's storage) and its page, with every request and page error noted."""

    def __init__(self, browser: Browser, origin: str) -> None:
        self.origin = origin
        self.context: BrowserContext = browser.new_context(
            viewport={"width": 1280, "height": 900}, service_workers="block"
        )
        self.requests: list[str] = []
        self.foreign: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page: Page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _route(self, route: Route) -> None:
        url = route.request.url
        self.requests.append(url)
        if url == self.origin or url.startswith(self.origin + "/"):
            route.continue_()
        else:  # never let it out, and fail the test
            self.foreign.append(url)
            route.abort()

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"uncaught errors in the page: {self.errors}"
        assert not self.foreign, f"the page requested other origins: {self.foreign}"


@pytest.fixture
def session(browser: Browser, server: LiveServer) -> Iterator[Session]:
    s = Session(browser, server.url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def keyed_server(llava_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(base_settings(llava_dir, api_key=API_KEY)).start()
    yield live
    live.stop()


# ------------------------------------------------------------------------------------------- helpers
def api_caption(
    server: LiveServer, image: bytes, level: float, *, max_tokens: int = MAX_TOKENS, api_key: str | None = None
) -> dict[str, Any]:
    """What `POST /caption` answers for the image at one level (greedy, the default prompt)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with server.client() as c:
        r = c.post(
            "/caption",
            files={"image": ("image.png", image, "image/png")},
            headers=headers,
            data={"conservativeness": str(level), "max_tokens": str(max_tokens), "temperature": "0"},
        )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def upload(page: Page, data: bytes, name: str = "photo.png", mime: str = "image/png") -> None:
    page.locator("#image-input").set_input_files({"name": name, "mimeType": mime, "buffer": data})


def set_max_tokens(page: Page, n: int) -> None:
    page.get_by_label("Max tokens").fill(str(n))


def solid_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buf, "PNG")
    return buf.getvalue()


def categories(caption: str) -> set[str]:
    return {category for _, category in caption_objects(caption)}


# ------------------------------------------------------------------------------------- HTTP surface
def test_root_sends_a_browser_to_the_playground(server: LiveServer) -> None:
    r = httpx.get(server.url + "/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "playground"
    page = httpx.get(server.url + "/", follow_redirects=True)
    assert page.status_code == 200 and str(page.url) == server.url + "/playground"
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>sevi-serve playground</title>" in page.text


def test_page_and_assets_forbid_other_origins(server: LiveServer) -> None:
    page = httpx.get(server.url + "/playground")
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "style-src 'self'"):
        assert directive in policy
    for asset, media in (
        ("playground.js", "text/javascript"),
        ("playground.css", "text/css"),
        ("samples/samples.json", "application/json"),
        ("samples/kitchen.png", "image/png"),
    ):
        r = httpx.get(f"{server.url}/playground/assets/{asset}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), asset
        assert r.headers["content-security-policy"] == policy
    for missing in ("nope.js", "../routes/playground.py", "..%2F__init__.py", "%2Fetc%2Fpasswd"):
        assert httpx.get(f"{server.url}/playground/assets/{missing}").status_code == 404, missing
    assert "http://" not in page.text and "https://" not in page.text  # nothing in the page names another origin


def test_config_and_vocabulary_need_no_key(server: LiveServer, keyed_server: LiveServer) -> None:
    config = httpx.get(server.url + "/playground/config.json").json()
    assert config["auth_required"] is False
    assert config["default_levels"] == list(LEVELS) and config["default_prompt"] == DEFAULT_PROMPT
    assert config["presets"] == {"off": 0.0, "balanced": 0.5, "focused": 1.0}
    assert config["max_image_bytes"] == server.settings.max_image_bytes
    keyed = keyed_server.url
    assert httpx.get(keyed + "/playground/config.json").json()["auth_required"] is True
    for path in ("/playground", "/playground/assets/playground.js", "/playground/vocabulary.json"):
        assert httpx.get(keyed + path).status_code == 200, path
    assert httpx.post(keyed + "/caption", files={"image": ("a.png", png_bytes(), "image/png")}).status_code == 401
    served = httpx.get(server.url + "/playground/vocabulary.json").json()["objects"]
    assert served == surface_forms()


def test_levels_and_presets_follow_the_models_knob_map(browser: Browser, llava_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(llava_dir, model)
    (model / "sevi_presets.json").write_text(
        json.dumps(
            {
                "format": 1,
                "balanced": 0.4,
                "focused": 0.9,
                "contrast": True,
                "knots": [
                    {"c": 0.0, "omega": 0.0, "start_layer": 2, "kappa": 0.2},
                    {"c": 1.0, "omega": 4.0, "start_layer": 1, "kappa": 0.2},
                ],
            }
        )
    )
    live = LiveServer(base_settings(model)).start()
    try:
        config = httpx.get(live.url + "/playground/config.json").json()
        assert config["presets"] == {"off": 0.0, "balanced": 0.4, "focused": 0.9}
        assert config["default_levels"] == [0.0, 0.4, 0.9]
        s = Session(browser, live.url)
        open_playground(s.page, live.url)
        assert s.page.locator("#levels input").evaluate_all("(inputs) => inputs.map((i) => i.value)") == [
            "0",
            "0.4",
            "0.9",
        ]
        assert s.page.locator("#levels select").evaluate_all(
            "(selects) => selects.map((s) => s.selectedOptions[0].text)"
        ) == ["Off", "Balanced", "Focused"]
        s.close()
    finally:
        live.stop()


# --------------------------------------------------------------------------------------- in the browser
def test_compare_streams_captions_equal_to_the_api(session: Session, server: LiveServer) -> None:
    page, image = session.page, png_bytes(3)
    chat_bodies: list[Any] = []
    page.on(
        "request", lambda r: chat_bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None
    )
    open_playground(page, server.url)
    upload(page, image)
    page.locator("#preview").wait_for()
    assert page.locator("#image-name").inner_text() == "photo.png"
    set_max_tokens(page, MAX_TOKENS)
    with comparison(page, 3):
        page.get_by_role("button", name="Compare").click()

    captions = column_captions(page)
    assert sorted(captions) == list(LEVELS)
    for level in LEVELS:
        api = api_caption(server, image, level)
        assert captions[level] == api["caption"], level
        facts = column_facts(page, level)
        assert facts["Rows aligned"] == str(api["telemetry"]["aligned_rows"])
        assert facts["Heads re-weighted"] == str(api["telemetry"]["heads_reweighted"])
        assert facts["Tokens"].split()[0] == str(api["usage"]["completion_tokens"])
        assert facts["Latency"].endswith(" s")
    assert page.locator(".column .level-title").all_inner_texts() == [
        "c = 0 · Off",
        "c = 0.5 · Balanced",
        "c = 1 · Focused",
    ]
    # Each column streamed its own request through the OpenAI endpoint.
    assert sorted(b["conservativeness"] for b in chat_bodies) == list(LEVELS)
    assert all(b["stream"] is True and b["temperature"] == 0 for b in chat_bodies)
    assert page.locator("#status").inner_text().startswith("3 of 3 captions")
    screenshot(page, ARTIFACTS / "playground-compare.png")


def test_marks_object_words_not_named_in_every_caption(session: Session, server: LiveServer) -> None:
    # The tiny random model names random words; find an image whose captions differ in the objects they name.
    for seed in range(40):
        image = png_bytes(seed)
        api = {level: api_caption(server, image, level)["caption"] for level in LEVELS}
        named = {level: categories(text) for level, text in api.items()}
        if len({frozenset(s) for s in named.values()}) > 1:
            break
    else:
        pytest.fail("no image among 40 whose captions name different objects")
    page = session.page
    open_playground(page, server.url)
    upload(page, image)
    set_max_tokens(page, MAX_TOKENS)
    with comparison(page, 3):
        page.get_by_role("button", name="Compare").click()

    everywhere = set.intersection(*named.values())
    for level in LEVELS:
        column = page.locator(f'#columns .column[data-level="{level:g}"]')
        marks = column.locator(".caption mark.diff")
        marked = {m.get_attribute("data-category") for m in marks.all()}
        assert marked == named[level] - everywhere, (level, api[level])
        for mark in marks.all():  # each mark covers a word the scorer reads as that object
            assert categories(mark.inner_text()) == {mark.get_attribute("data-category")}
            assert "not named at c = " in (mark.get_attribute("title") or "")
        assert column.locator(".caption").text_content() == api[level]  # marking keeps the text as it was
    screenshot(page, ARTIFACTS / "playground-marks.png")


def test_page_reads_object_words_as_the_chair_scorer(session: Session, server: LiveServer) -> None:
    captions = [make_scene(split, i, render=False).caption for split in ("train", "counter-prior") for i in range(150)]
    captions += [
        "Two hot dogs and a teddy bear.",
        "A baby bird on the toilet seat.",
        "People near the train tracks.",
        "Three puppies, knives and forks.",
        "A man on a motor bike by the traffic lights.",
        "An adult elephant and passenger trains.",
        "A stove top oven; wine glasses.",
    ]
    open_playground(session.page, server.url)
    found = session.page.evaluate(
        """async (captions) => {
             const { Vocabulary } = await import('./playground/assets/objects.js');
             const forms = (await (await fetch('playground/vocabulary.json')).json()).objects;
             const vocabulary = new Vocabulary(forms);
             return captions.map((c) => vocabulary.find(c).map((m) => [c.slice(m.start, m.end), m.category]));
           }""",
        captions,
    )
    for caption, mentions in zip(captions, found, strict=True):
        assert [cat for _, cat in mentions] == [cat for _, cat in caption_objects(caption)], caption
        assert all(categories(surface) == {cat} for surface, cat in mentions), caption


def test_sample_scene_and_single_level_slider(session: Session, server: LiveServer) -> None:
    page = session.page
    open_playground(page, server.url)
    choose_sample(page, "Kitchen")
    assert page.locator("#truth-legend").is_visible()
    sample = httpx.get(server.url + "/playground/assets/samples/kitchen.png").content
    page.get_by_label("One level (slider)").check()
    assert page.get_by_role("button", name="Caption").is_visible()
    set_max_tokens(page, MAX_TOKENS)
    with comparison(page, 1):
        page.get_by_label("Level", exact=True).fill("0.75")  # a slider's value, then its change event: it captions
    assert page.locator("#slider-value").inner_text() == "0.75"
    assert column_captions(page) == {0.75: api_caption(server, sample, 0.75)["caption"]}


def test_drop_an_image(session: Session, server: LiveServer) -> None:
    page, image = session.page, png_bytes(6)
    open_playground(page, server.url)
    transfer = page.evaluate_handle(
        """(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'dropped.png', { type: 'image/png' }));
        return transfer;
      }""",
        base64.b64encode(image).decode(),
    )
    page.dispatch_event("#drop-zone", "dragover", {"dataTransfer": transfer})
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    page.locator("#preview").wait_for()
    assert page.locator("#image-name").inner_text() == "dropped.png"
    set_max_tokens(page, MAX_TOKENS)
    with comparison(page, 3):
        page.get_by_role("button", name="Compare").click()
    assert column_captions(page)[1.0] == api_caption(server, image, 1.0)["caption"]


def test_stop_cancels_a_slow_comparison(session: Session, server: LiveServer) -> None:
    page = session.page
    open_playground(page, server.url)
    upload(page, long_png())  # about 750 greedy tokens before its end on this model
    set_max_tokens(page, 900)
    cancelled = server.engine.stats().cancelled_total
    with comparison(page, 3):
        page.get_by_role("button", name="Compare").click()
        page.locator("#columns .column[data-state=streaming] .caption:not(:text-is('…'))").first.wait_for()
        page.get_by_role("button", name="Stop").click()
    stopped = page.locator("#columns .column[data-state=error] .error")
    assert stopped.count() >= 1 and set(stopped.all_inner_texts()) == {"Stopped."}
    assert page.get_by_role("alert").is_hidden()  # stopping is no failure to report
    assert page.get_by_role("button", name="Stop").is_disabled()
    eventually(  # the server cancels what the page stopped, and frees its slots
        lambda: server.engine.stats().cancelled_total >= cancelled + stopped.count(),
        timeout_s=30,
        interval_s=0.1,
        what="the server to cancel the requests of the stopped columns",
    )


def test_non_image_file_is_refused_in_plain_words(session: Session, server: LiveServer) -> None:
    page = session.page
    open_playground(page, server.url)
    upload(page, b"these are my notes, not a picture\n", name="notes.txt", mime="text/plain")
    expect(page.locator("#image-name")).to_contain_text("cannot show it as an image")
    with comparison(page, 3):
        page.get_by_role("button", name="Compare").click()
    alert = page.get_by_role("alert")
    assert alert.inner_text() == (
        "The server could not read this file as an image. Use a PNG, JPEG, WebP, GIF or BMP image."
    )
    assert page.locator("#columns .column[data-state=error]").count() == 3
    # Over the server's pixel limit (512 x 512 here): its 413, in plain words.
    upload(page, solid_png(600, 600), name="wide.png")
    with comparison(page, 3):
        page.get_by_role("button", name="Compare").click()
    assert alert.inner_text() == (
        "The image is too large for this server (at most 0.25 MB and 0.3 million pixels). Use a smaller image."
    )
    # Over its byte limit (256 KiB): said before anything is sent, and the image before it is dropped.
    upload(page, b"\x89PNG" + bytes(300 * 1024), name="huge.png")
    expect(alert).to_have_text("huge.png is too large: this server takes images of at most 0.25 MB.")
    expect(page.locator("#preview")).to_be_hidden()
    # The page is not stuck: a real image after the failures captions as usual.
    upload(page, png_bytes(5))
    set_max_tokens(page, MAX_TOKENS)
    with comparison(page, 3):
        page.get_by_role("button", name="Compare").click()
    assert page.locator("#columns .column[data-state=done]").count() == 3
    assert alert.is_hidden()


def test_queue_full_is_said_and_the_other_columns_finish(browser: Browser, small_server: LiveServer) -> None:
    s = Session(browser, small_server.url)  # one batch slot and one queue slot
    page = s.page
    open_playground(page, small_server.url)
    upload(page, long_png())
    set_max_tokens(page, 300)  # long enough that five requests arrive while the first still runs
    page.get_by_role("button", name="Add a level").click()
    page.get_by_role("button", name="Add a level").click()
    with comparison(page, 5):
        page.get_by_role("button", name="Compare").click()
    assert page.locator("#columns .column[data-state=done]").count() >= 1
    assert page.locator("#columns .column[data-state=error]").count() >= 1
    assert "The server is busy: its queue is full. Try again in 1 second." in page.get_by_role("alert").inner_text()
    s.close()


def test_api_key_asked_once_and_kept_for_the_tab(browser: Browser, keyed_server: LiveServer) -> None:
    s = Session(browser, keyed_server.url)
    page, image = s.page, png_bytes(4)
    open_playground(page, keyed_server.url)
    key_field = page.get_by_role("textbox", name="API key")
    assert key_field.is_visible()
    upload(page, image)
    set_max_tokens(page, MAX_TOKENS)
    compare = page.get_by_role("button", name="Compare")
    compare.click()  # no key yet: the page asks for it before sending anything
    expect(page.get_by_role("alert")).to_contain_text("needs an API key")
    assert page.evaluate("() => document.activeElement.id") == "api-key"
    assert page.locator("#columns .column").count() == 0

    key_field.fill("wrong-key")
    with comparison(page, 3):
        compare.click()
    assert page.get_by_role("alert").inner_text().startswith("The server did not accept the API key.")
    assert page.evaluate("() => document.activeElement.id") == "api-key"

    key_field.fill(API_KEY)
    with comparison(page, 3):
        compare.click()
    assert page.locator("#columns .column[data-state=done]").count() == 3
    assert column_captions(page)[0.5] == api_caption(keyed_server, image, 0.5, api_key=API_KEY)["caption"]
    # Kept for this tab (sessionStorage), never in localStorage; a reload still has it.
    assert page.evaluate("() => [sessionStorage.getItem('sevi-playground-api-key'), localStorage.length]") == [
        API_KEY,
        0,
    ]
    page.reload()
    page.locator("body[data-ready=true]").wait_for()
    assert key_field.input_value() == API_KEY
    page.get_by_role("button", name="Forget the key").click()
    assert key_field.input_value() == "" and page.evaluate("() => sessionStorage.length") == 0
    s.close()
    # Another tab (a new context) starts without it.
    other = Session(browser, keyed_server.url)
    open_playground(other.page, keyed_server.url)
    assert other.page.get_by_role("textbox", name="API key").input_value() == ""
    other.close()


def test_keyboard_alone_runs_a_comparison(session: Session, server: LiveServer) -> None:
    page = session.page
    open_playground(page, server.url)
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter((e) => e.labels.length === 0 && !e.getAttribute('aria-label')).map((e) => e.id)""")
    assert unlabelled == []
    order: list[str] = []  # from a fresh page: focus starts at the document (max tokens: the server's 8)

    def tab_to(predicate: str, limit: int = 40) -> None:
        for _ in range(limit):
            page.keyboard.press("Tab")
            order.append(page.evaluate("() => document.activeElement.id || document.activeElement.textContent.trim()"))
            if page.evaluate(f"() => {predicate}"):
                return
        raise AssertionError(f"Tab never reached {predicate}; focus went {order}")

    tab_to("document.activeElement.classList.contains('sample')")
    page.keyboard.press("Enter")
    page.locator(".sample[aria-pressed=true]").wait_for()
    tab_to("document.activeElement.id === 'run'")
    with comparison(page, 3):
        page.keyboard.press("Enter")
    assert page.locator("#columns .column[data-state=done]").count() == 3
    # Focus follows the page's reading order: the image, the samples, the levels, the prompt, then Compare.
    first = {name: order.index(name) for name in ("image-input", "level-1", "prompt", "run") if name in order}
    assert list(first) == ["image-input", "level-1", "prompt", "run"], order
    assert sorted(first.values()) == list(first.values()), order
