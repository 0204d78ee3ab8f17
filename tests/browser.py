"""Headless Debian Chromium driven by Playwright for Python (no browser download), for the tests that
click what a reader clicks. Screenshots go to $COVIDLIB_SCREENSHOTS (.ci/run keeps them)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def chromium_page(width: int = 1280, height: int = 1000) -> Iterator:
    """A page whose JavaScript errors and console errors collect in ``page.errors``."""
    required = os.environ.get("COVIDLIB_REQUIRE_BROWSER") == "1"  # .ci/run: a missing browser fails, not skips
    if CHROMIUM is None:
        (pytest.fail if required else pytest.skip)("Debian chromium is not installed (.ci/run installs it)")
    if required:
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
            yield page
        finally:
            browser.close()


def screenshot_dir(default: Path) -> Path:
    out = Path(os.environ.get("COVIDLIB_SCREENSHOTS", default))
    out.mkdir(parents=True, exist_ok=True)
    return out


class Explorer:
    """The first kernel-free map explorer on a page, driven control by control."""

    def __init__(self, page):
        self.page = page
        self.root = page.locator(".covidlib-explorer").first
        self.root.wait_for(state="attached")
        self.root.scroll_into_view_if_needed()
        self._wait(0)

    def errors(self, also_known: tuple[str, ...] = ()) -> list[str]:
        """The page's errors less three a book page logs on load whatever it shows (jupyter-book 1
        declares THEBE_JS_URL twice, the vendored widget manager asks for fonts it does not ship,
        pydata-sphinx-theme reads an empty theme mode on a first visit) and ``also_known``."""
        known = ("Identifier 'THEBE_JS_URL' has already been declared", "Failed to load resource: net::ERR_FILE_NOT_FOUND",
                 "Got invalid theme mode: . Resetting to auto.", *also_known)
        return [e for e in self.page.errors if not e.startswith(known)]

    def contrast(self) -> float:
        """Brightness difference (0..1) between a control's text and the explorer's own background."""
        return self.root.evaluate("""el => {
            const level = (c) => c.match(/[\\d.]+/g).slice(0, 3).reduce((a, b) => a + Number(b), 0) / 765;
            const select = el.querySelector('select');
            return Math.abs(level(getComputedStyle(select).color) - level(getComputedStyle(el).backgroundColor));
        }""")

    def _wait(self, after: int) -> None:
        self.page.wait_for_function("([el, n]) => Number(el.dataset.drawn || 0) > n",
                                    arg=[self.root.element_handle(), after], timeout=30_000)

    def drawn(self) -> int:
        return int(self.root.get_attribute("data-drawn"))

    def picture(self) -> str:
        """Every panel's pixels (as data URLs), joined: what a reader sees."""
        return self.root.evaluate("el => [...el.querySelectorAll('canvas')].map(c => c.toDataURL()).join('|')")

    def caption(self) -> str:
        return self.root.locator("[data-role=caption]").inner_text()

    def options(self, role: str) -> list[str]:
        return self.root.locator(f"[data-role={role}] option").evaluate_all("os => os.map(o => o.value)")

    def visible(self, role: str) -> bool:
        return self.root.locator(f"[data-role={role}]").is_visible()

    def shoot(self, path: Path) -> None:
        """The explorer as a reader sees it: on the page's own background, no focus ring or skip link."""
        self.page.evaluate("document.activeElement && document.activeElement.blur()")
        box = self.root.bounding_box()
        self.page.set_viewport_size({"width": self.page.viewport_size["width"], "height": int(box["height"]) + 200})
        self.root.scroll_into_view_if_needed()
        self.page.screenshot(path=str(path))

    def panels(self) -> int:
        return self.root.locator("canvas").count()

    def set(self, role: str, value) -> None:
        """Change one control as a reader would, and wait until the page has drawn it."""
        before = self.drawn()
        control = self.root.locator(f"[data-role={role}]")
        if role == "all":
            control.set_checked(bool(value))
        elif role == "alpha":
            control.fill(str(value))
        else:
            control.select_option(str(value))
        self._wait(before)
        assert "cx-error" not in (self.root.locator("[data-role=caption]").get_attribute("class") or ""), self.caption()


def exercise(explorer: Explorer, shots: Path | None = None, prefix: str = "explorer",
             known_errors: tuple[str, ...] = ()) -> list[str]:
    """Change each control in turn; every change must change the picture and log no error (but
    ``known_errors``, other parts of the page's). Returns what was changed."""
    changed = []

    def step(role: str, value, name: str) -> None:
        before = explorer.picture()
        explorer.set(role, value)
        assert explorer.picture() != before, f"changing {name} did not change the picture ({explorer.caption()})"
        changed.append(name)

    assert explorer.panels() == 1 and not explorer.errors(known_errors), explorer.errors(known_errors)
    step("slice", explorer.options("slice")[-1], "the slice (to a non-COVID one)")
    step("class", "non-covid", "the class (Grad-CAM)")  # not on saliency: |gradient| is the same for both classes
    step("method", "saliency", "the method (saliency)")
    step("alpha", 0.9, "the opacity")
    step("method", "heatmaps", "the method (a layer's heat map)")
    assert explorer.visible("layer") and not explorer.visible("class")
    step("layer", explorer.options("layer")[0], "the layer")
    step("method", "activations", "the method (a layer's activations)")
    if shots:
        explorer.shoot(shots / f"{prefix}-one-model.png")
    step("model", explorer.options("model")[-1], "the model")
    step("all", True, "every model side by side")
    assert explorer.panels() == len(explorer.options("model"))
    if shots:
        explorer.shoot(shots / f"{prefix}-side-by-side.png")
    assert not explorer.errors(known_errors), explorer.errors(known_errors)
    return changed


@contextmanager
def jupyter_lab(root: Path, python: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """``jupyter lab`` from ``python``'s environment on a free local port with a token; yields the
    URL to open (a notebook's name goes in its ``{}``) and shuts the server down afterwards.
    ``env`` adds variables to the server's (and its kernels') environment; an empty value removes one."""
    token = secrets.token_hex(16)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    settings = log.parent / "lab-settings"
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True, exist_ok=True)
    tracker.write_text('{"windowingMode": "none"}')  # every cell in the page, as a reader scrolls them
    command = [python, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--allow-root"]  # CI runs as root
    environment = {**{k: v for k, v in os.environ.items() if k not in env}, **{k: v for k, v in env.items() if v},
                   "JUPYTERLAB_WORKSPACES_DIR": str(settings),
                   "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTER_RUNTIME_DIR": str(settings / "runtime")}
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=root, env=environment, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"jupyter lab did not start: {log.read_text()[-2000:]}") from None
                    time.sleep(1)
            yield f"{base}/lab/tree/{{}}?reset&token={token}"  # reset: a fresh workspace, only that notebook open
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def run_all_cells(page, url: str, timeout_s: int = 900) -> None:
    """Open a notebook in JupyterLab, wait for its kernel, Run > Run All Cells, and wait until every
    code cell has run (each prompt numbered, none busy) or one has failed (JupyterLab stops there)."""
    page.goto(url)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
    started = "() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt')].some(p => /\\[[\\d*]+\\]/.test(p.textContent))"
    if not getattr(page, "answers_dialogs", False):
        page.add_locator_handler(page.locator(".jp-Dialog"), lambda dialog: _answer(page, dialog))
        page.answers_dialogs = True
    _wait_for_idle_kernel(page)
    for _ in range(10):  # a click before the kernel has connected is dropped: click again
        _click_run_all(page)
        try:
            page.wait_for_function(started, timeout=15_000)
            break
        except Exception:  # playwright's TimeoutError
            continue
    else:
        page.screenshot(path=str(screenshot_dir(Path(".")) / "jupyterlab-did-not-start.png"))
        raise AssertionError(f"Run All Cells did not start {url.split('?')[0]} ({len(page.errors)} page errors)")
    news = page.get_by_role("button", name="No", exact=True)  # JupyterLab asks once about its news feed
    if news.count():
        news.first.click()
    _wait_for_cells(page, url.split("?")[0].rsplit("/", 1)[-1], timeout_s)


_IS_ERROR = "t => t.includes('Traceback (most recent call last)') || /^\\w+Error: /m.test(t)"  # an output's text
_PROGRESS = """() => {
    const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
    const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent);
    const dialog = document.querySelector('.jp-Dialog');
    const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
    return {total: prompts.length, done: prompts.filter(t => /\\[\\d+\\]/.test(t)).length,
            busy: prompts.filter(t => t.includes('*')).length,
            failed: [...panel.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText).some(""" + _IS_ERROR + """),
            dialog: dialog ? dialog.innerText.slice(0, 300) : null,
            kernel: indicator ? (indicator.dataset.status || indicator.getAttribute('title') || '') : '',
            ready: /\\|\\s*Idle\\b/.test((document.querySelector('#jp-main-statusbar') || {}).innerText || '')};
}"""


def _click_run_all(page) -> None:
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()


def _wait_for_idle_kernel(page, timeout_s: int = 180) -> None:
    """Until the status bar shows the notebook's kernel idle ("Python 3 (ipykernel) | Idle"; the
    toolbar's execution indicator says idle before any kernel exists), answering dialogs on the way
    (the locator handler answers only while an action waits). A Run All sent while the kernel
    connects is dropped or cut short: CI saw 1 of 13 cells run, none queued."""
    start = time.monotonic()
    while not (state := page.evaluate(_PROGRESS))["ready"]:
        if time.monotonic() - start > timeout_s:
            page.screenshot(path=str(screenshot_dir(Path(".")) / "jupyterlab-no-kernel.png"))
            raise AssertionError(f"the kernel is not idle after {timeout_s} s: {state['kernel']!r}")
        if state["dialog"]:  # any action lets the locator handler answer it first (calling _answer here
            page.locator("#jp-main-statusbar").hover()  # would race the handler over the same dialog)
        time.sleep(1)


def _wait_for_cells(page, name: str, timeout_s: int, stall_s: int = 90) -> None:
    """Until every code cell has run, or one failed (JupyterLab stops there). Fails at once, with a
    screenshot and what the page shows, on a dialog (a kernel that died says so in one; Playwright's
    dialog handler answers only while an action waits) or when nothing runs and nothing changes for
    ``stall_s`` seconds; a progress screenshot is kept every minute."""
    shots = screenshot_dir(Path("."))
    start = time.monotonic()
    seen, since, shot, again = None, start, start, 2
    while True:
        state = page.evaluate(_PROGRESS)
        if state["failed"] or (state["total"] and state["done"] == state["total"] and not state["busy"]):
            return
        now = time.monotonic()
        progress = (state["done"], state["busy"])
        seen, since = (progress, now) if progress != seen else (seen, since)
        if again and not state["busy"] and not state["dialog"] and state["ready"] and now - since > 30:
            again -= 1  # Run All dropped or cut short (a kernel that reconnected): click it again, as a person would
            _click_run_all(page)
            since = now
            continue
        why = (f"a dialog: {state['dialog']!r}" if state["dialog"] and not state["dialog"].startswith("Select Kernel")
               else f"nothing ran for {stall_s} s" if now - since > stall_s and (not state["busy"] or "idle" in state["kernel"].lower())
               else f"still running after {timeout_s} s" if now - start > timeout_s else None)
        if why or now - shot > 60:
            page.screenshot(path=str(shots / f"jupyterlab-{'stopped' if why else 'progress'}-{name}.png"))
            shot = now
        if why:
            raise AssertionError(f"Run All in {name} stopped, {why}: {state['done']} of {state['total']} cells "
                                 f"run, {state['busy']} queued or running, kernel {state['kernel']!r} "
                                 f"after {now - start:.0f} s")
        time.sleep(2)


def _answer(page, dialogs) -> None:
    """JupyterLab's dialogs, answered as a person would, every one that is open (Run All on a notebook
    whose kernel is not there yet opens a kernel choice per cell; answering only the first left CI
    waiting for the rest to close): the kernel choice with the notebook's own Python kernel; any
    other dialog is recorded in ``page.errors``, photographed and dismissed."""
    shots = screenshot_dir(Path("."))
    for _ in range(50):
        if not dialogs.count():
            return
        dialog = dialogs.first
        text = dialog.inner_text()
        if text.startswith("Select Kernel"):
            select = dialog.locator("select")
            python = [o for o in select.locator("option").all_inner_texts() if o.startswith("Python 3")]
            if python:
                select.select_option(label=python[0])
            dialog.locator(".jp-mod-accept").first.click()
        else:
            page.errors.append(f"JupyterLab dialog: {text[:300]}")
            page.screenshot(path=str(shots / f"jupyterlab-dialog-{len(page.errors)}.png"))
            buttons = dialog.locator(".jp-mod-reject")
            (buttons if buttons.count() else dialog.locator(".jp-mod-accept")).first.click()
        page.wait_for_timeout(300)  # the dialog's close animation
    page.screenshot(path=str(shots / "jupyterlab-dialogs-stay.png"))
    raise AssertionError(f"JupyterLab dialogs stay open: {dialogs.first.inner_text()[:300]!r}")


def error_outputs(page) -> list[str]:
    """The text of every output that shows a Python error."""
    return page.evaluate("""() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')]
        .map(o => o.innerText).filter(""" + _IS_ERROR + ")")


def widget_dropdown(page, label: str):
    """An ipywidgets Dropdown by its label (ipywidgets 7 and 8 both render a label and a <select>)."""
    return page.locator(".widget-dropdown", has=page.locator("label", has_text=label)).locator("select").first


def picture_bytes(locator) -> bytes:
    return locator.screenshot()


def wait_for_new_picture(page, image, before: bytes, timeout_s: float = 180) -> None:
    """Poll an ipywidgets Image until it shows another picture (the kernel loads and traces a model
    first: tens of seconds on two busy cores)."""
    deadline = time.monotonic() + timeout_s
    while picture_bytes(image) == before:
        assert time.monotonic() < deadline, "the live explorer's picture did not change"
        page.wait_for_timeout(1000)
