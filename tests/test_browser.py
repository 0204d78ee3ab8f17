"""The JupyterLab Run All watcher (tests/browser.py) on a scripted page: it clicks Run All again when a
run stops short with the kernel idle (CI once saw 1 of 13 cells run, none queued), at most twice, and
fails with the page's counts on a stall or a dialog, so a browser test never hangs or passes half-run."""

from __future__ import annotations

import types

import pytest

from tests import browser


class ScriptedPage:
    """What ``_wait_for_cells`` reads and clicks, with a clock that each ``sleep`` moves on."""

    def __init__(self, script):
        self.script, self.now, self.reruns, self.hovers = script, 0.0, 0, 0

    def evaluate(self, _js):
        state = {"total": 13, "done": 0, "busy": 0, "failed": False, "dialog": None, "kernel": "idle", "ready": True}
        return {**state, **self.script(self.now, self.reruns)}

    def get_by_role(self, *_args, **_kw):
        return types.SimpleNamespace(click=lambda: None)

    def locator(self, selector):
        if selector == "#jp-main-statusbar":  # the harmless action that lets the dialog handler run
            return types.SimpleNamespace(hover=self._hover)
        assert "run-all" in selector
        return types.SimpleNamespace(click=self._run_all)

    def _run_all(self):
        self.reruns += 1

    def _hover(self):
        self.hovers += 1

    def screenshot(self, path):
        pass


@pytest.fixture
def scripted(monkeypatch, tmp_path):
    monkeypatch.setenv("COVIDLIB_SCREENSHOTS", str(tmp_path))

    def make(script):
        page = ScriptedPage(script)
        clock = types.SimpleNamespace(monotonic=lambda: page.now, sleep=lambda s: setattr(page, "now", page.now + s))
        monkeypatch.setattr(browser, "time", clock)
        return page
    return make


def test_a_run_cut_short_with_the_kernel_idle_is_started_again_and_then_finishes(scripted):
    def script(now, reruns):
        if not reruns:
            return {"done": 1}  # the CI stall: one cell run, nothing queued, the kernel idle
        return {"done": 13} if now > 60 else {"done": 1, "busy": 12, "kernel": "busy"}
    page = scripted(script)
    browser._wait_for_cells(page, "train.ipynb", timeout_s=900)
    assert page.reruns == 1 and 30 < page.now < 70


def test_a_run_that_never_moves_fails_after_two_more_tries_with_the_counts(scripted):
    page = scripted(lambda now, reruns: {"done": 1})
    with pytest.raises(AssertionError, match=r"nothing ran for 90 s: 1 of 13 cells run, 0 queued or running, "
                                             r"kernel 'idle'"):
        browser._wait_for_cells(page, "train.ipynb", timeout_s=900)
    assert page.reruns == 2


def test_a_stall_with_a_dialog_open_is_not_run_again_but_fails_naming_the_dialog(scripted):
    page = scripted(lambda now, reruns: {"done": 1, "dialog": "Kernel Restarting\nThe kernel appears to have died."})
    with pytest.raises(AssertionError, match="a dialog: 'Kernel Restarting"):
        browser._wait_for_cells(page, "train.ipynb", timeout_s=900)
    assert page.reruns == 0 and page.now == 0


def test_run_all_waits_for_the_status_bar_s_idle_kernel_and_lets_the_handler_answer_a_dialog(scripted):
    """The toolbar says idle before a kernel exists; only the status bar's "| Idle" counts."""
    page = scripted(lambda now, reruns: {"ready": now > 20, "dialog": "Select Kernel" if 5 < now < 8 else None})
    browser._wait_for_idle_kernel(page)
    assert 20 < page.now < 23 and page.hovers >= 1
    page = scripted(lambda now, reruns: {"ready": False})
    with pytest.raises(AssertionError, match="the kernel is not idle after 180 s"):
        browser._wait_for_idle_kernel(page)


def test_a_busy_kernel_is_waited_for_and_a_dialog_fails_at_once(scripted):
    page = scripted(lambda now, reruns: {"done": 3, "busy": 10, "kernel": "busy"} if now < 300 else
                    {"done": 3, "busy": 10, "kernel": "busy", "dialog": "Kernel Restarting\nThe kernel died."})
    with pytest.raises(AssertionError, match="a dialog: 'Kernel Restarting"):
        browser._wait_for_cells(page, "explainability.ipynb", timeout_s=900)
    assert page.reruns == 0 and page.now >= 300
