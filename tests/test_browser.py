"""End to end in a real browser: JupyterLab and Voila started here on loopback, Debian's chromium
driven by Playwright, the quickstart notebook's Workbench used as a researcher would.

Screenshots and the measured slider-to-first-token latencies go to ``test-artifacts/``.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "workbench-browser-test"
TOKYO = "Give me tourist information about Tokyo."


def _workdir(tmp: Path) -> Path:
    """A copy of the notebooks (they write outputs/) and Lab settings that silence the news toast."""
    shutil.copytree(ROOT / "notebooks", tmp / "notebooks", ignore=shutil.ignore_patterns("outputs", ".ipynb_checkpoints"))
    (tmp / "notebooks" / "outputs").mkdir(exist_ok=True)
    settings = tmp / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                           "checkForUpdates": False}))
    (tmp / "lab-workspaces").mkdir()
    return tmp


def _start(cmd, cwd, env, url, timeout=120) -> subprocess.Popen:
    """Start a server; ready when ``url`` answers (or, for ``url=None``, when its port accepts connections)."""
    import socket

    # the server's (and, through it, the kernels') output goes to a file: a pipe nobody reads fills
    # up (64 KiB) and then blocks the server mid-test
    log = open(Path(cwd) / f"{Path(cmd[0]).name}.log", "ab")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    proc.log_path = Path(cwd) / f"{Path(cmd[0]).name}.log"
    port = int(next(a for a in cmd if a.startswith("--port=")).split("=")[1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {_log_tail(proc)}")
        try:
            if url is None:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                return proc
            if httpx.get(url, timeout=2).status_code < 500:
                return proc
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    stop_process(proc)
    raise RuntimeError(f"{cmd} did not answer at {url} within {timeout}s")


def _log_tail(proc, chars: int = 3000) -> str:
    """The end of what a server started by ``_start`` printed."""
    return proc.log_path.read_bytes().decode(errors="replace")[-chars:]


def _env(tmp: Path) -> dict:
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "lab-workspaces"), PYTHONUNBUFFERED="1")
    env.pop("CI", None)  # the kernel is not a test process
    return env


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from _serve_lab(_workdir(tmp_path_factory.mktemp("lab")))


def _serve_lab(tmp: Path):
    """Start JupyterLab on loopback in ``tmp``, yield its URL, stop it."""
    port = free_port()
    root_flag = ["--allow-root"] if os.geteuid() == 0 else []
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp}", *root_flag]
    proc = _start(cmd, tmp, _env(tmp), f"http://127.0.0.1:{port}/api/status?token={TOKEN}")
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


def _menu_click(page, menu: str, item: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=menu).first.click()
    page.locator(".lm-Menu-itemLabel").get_by_text(item, exact=True).first.click()


def _run_all(page) -> None:
    """Run > Run All Cells, once the kernel is idle; retried until the first cell is queued or ran."""
    page.get_by_text("| Idle").first.wait_for(timeout=120_000)
    for _ in range(5):
        _menu_click(page, "Run", "Run All Cells")
        try:
            page.wait_for_function("() => [...document.querySelectorAll('.jp-InputPrompt')]"
                                   ".some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))", timeout=10_000)
            return
        except Exception:
            page.keyboard.press("Escape")
    raise AssertionError("Run All Cells did not start the notebook")


def _text(page, selector: str) -> str:
    return page.locator(selector).first.text_content() or ""


def _reply(page, kind: str) -> str:
    text = _text(page, f".wb-stream-{kind}")
    return text.rsplit("Assistant: ", 1)[-1] if "Assistant: " in text else ""


def _drag_slider(page, selector: str, dx: float) -> None:
    handle = page.locator(f"{selector} .noUi-handle").first
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 6):
        page.mouse.move(x + dx * i / 5, y)
    page.mouse.up()


def _assert_no_widget_errors(page) -> None:
    for text in ("Error displaying widget", "Click to show javascript error", "Failed to load model class"):
        assert page.get_by_text(text).count() == 0, f"a widget failed to render: {text!r}"


def _scroll_to(page, selector: str, timeout: float = 120.0) -> None:
    """Scroll the notebook down until ``selector`` is rendered: Lab 4 renders only the cells in view,
    and after a reload it may open the notebook at the top, far above the Workbench cell."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page.evaluate("""() => document.querySelectorAll('.jp-WindowedPanel-outer, .jp-NotebookPanel-notebook, .jp-Notebook')
                                 .forEach(e => { e.scrollTop = e.scrollHeight; })""")
        if page.locator(selector).count():
            page.locator(selector).first.scroll_into_view_if_needed()
            return
        time.sleep(1.0)
    raise AssertionError(f"{selector} did not render within {timeout:.0f}s after scrolling")


def _plot_traces(page, panel: str) -> int:
    return page.locator(f"{panel} .js-plotly-plot .scatterlayer .trace").count()


def test_quickstart_workbench_in_jupyterlab(lab, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.set_default_timeout(60_000)
    page.goto(f"{lab}/lab/tree/notebooks/01_quickstart.ipynb?token={TOKEN}")
    page.locator(".jp-Notebook").first.wait_for()
    _run_all(page)
    search = page.locator(".wb-picker input[type='text']").first
    try:
        search.wait_for(timeout=400_000)   # every cell above runs first (model, generations, inspect)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "lab-0-failed.png"))
        raise
    page.locator(".wb-picker").first.scroll_into_view_if_needed()
    page.locator(".wb-picker").first.screenshot(path=str(ARTIFACTS / "lab-1-workbench.png"))
    _assert_no_widget_errors(page)

    # type into the search box, pick the top result
    search.click()
    search.press_sequentially("pirate", delay=60)
    page.wait_for_function("() => [...document.querySelectorAll('.wb-picker select option')]"
                           ".some(o => o.textContent.toLowerCase().includes('pirate'))", timeout=60_000)
    page.locator(".wb-picker .wb-pick").first.click()
    page.locator(".wb-dial").first.wait_for()

    # drag the strength slider up from 0.4
    readout = page.locator(".wb-dial .widget-readout").first
    before = float(readout.text_content())
    page.locator(".wb-dial").first.scroll_into_view_if_needed()
    _drag_slider(page, ".wb-dial .wb-strength", 4)
    page.wait_for_function(f"() => parseFloat(document.querySelector('.wb-dial .widget-readout').textContent) > {before}")
    assert float(readout.text_content()) > before

    # the plots are empty before the first turn
    assert _plot_traces(page, ".wb-norms") == 0

    # send a message; both columns receive tokens while they are still streaming
    page.locator(".wb-chat .wb-message textarea").first.fill(TOKYO)
    page.locator(".wb-chat .wb-send").first.click()
    page.wait_for_function("() => [...document.querySelectorAll('.wb-stream')].every(e => "
                           "(e.textContent.split('Assistant: ')[1] || '').length > 0)", timeout=120_000)
    stop_enabled = page.locator(".wb-chat .wb-stop").first.is_enabled()
    early = (_reply(page, "baseline"), _reply(page, "steered"))
    page.locator(".wb-chat").first.screenshot(path=str(ARTIFACTS / "lab-2-streaming.png"))
    time.sleep(1.0)
    later = (_reply(page, "baseline"), _reply(page, "steered"))
    assert stop_enabled, "the stop button should be enabled while replies stream"
    assert all(e and len(l) > len(e) and l.startswith(e) for e, l in zip(early, later)), (early, later)

    # when the turn ends the norms plot fills with data
    page.locator(".wb-chat .wb-stop[disabled]").first.wait_for(timeout=180_000)
    page.wait_for_function("() => document.querySelectorAll('.wb-norms .js-plotly-plot .scatterlayer .trace').length > 0",
                           timeout=120_000)
    traces = _plot_traces(page, ".wb-norms")
    assert traces >= 2
    final = (_reply(page, "baseline"), _reply(page, "steered"))
    assert final[0] != final[1]
    page.locator(".wb-norms").first.scroll_into_view_if_needed()
    page.locator(".wb-norms").first.screenshot(path=str(ARTIFACTS / "lab-3-norms.png"))
    page.set_viewport_size({"width": 1500, "height": 2700})   # the whole workbench in one picture (the README's)
    page.locator(".wb-workbench").first.scroll_into_view_if_needed()
    page.locator(".wb-workbench").first.screenshot(path=str(ARTIFACTS / "workbench.png"))
    page.set_viewport_size({"width": 1500, "height": 1100})

    # slider -> first steered token on screen (auto-regenerate); measured, reported, not asserted
    latencies = []
    page.evaluate("""() => {
        const box = document.querySelector('.wb-stream-steered');
        window.__wbChanges = [];
        new MutationObserver(() => window.__wbChanges.push([performance.now(), box.textContent]))
            .observe(box, {childList: true, characterData: true, subtree: true});
        document.addEventListener('mouseup', () => { window.__wbUp = performance.now(); }, true);
    }""")
    page.locator(".wb-dial").first.scroll_into_view_if_needed()
    for dx in (-4, 4, -4, 4, -4):
        page.wait_for_selector(".wb-chat .wb-stop[disabled]", timeout=180_000)
        page.locator(".wb-plots-ready").first.wait_for(timeout=180_000)   # as a researcher would: plots drawn
        page.evaluate("() => { window.__wbChanges = []; }")
        old_len = len(_text(page, ".wb-stream-steered"))
        _drag_slider(page, ".wb-dial .wb-strength", dx)
        t0 = page.evaluate("() => window.__wbUp")     # the moment the slider was released
        # the reply is cut back, then the first new token shows; both may land in one DOM update
        page.wait_for_function("""([t0, oldLen]) => window.__wbChanges.some(
            x => x[0] >= t0 && x[1].length < oldLen && !x[1].endsWith('Assistant: '))""", arg=[t0, old_len],
            timeout=60_000)
        changes = page.evaluate("(t0) => window.__wbChanges.filter(x => x[0] >= t0)", t0)
        first = next(c[0] for c in changes if len(c[1]) < old_len and not c[1].endswith("Assistant: "))
        latencies.append(first - t0)
    page.wait_for_selector(".wb-chat .wb-stop[disabled]", timeout=180_000)
    page.wait_for_function("() => document.querySelectorAll('.wb-norms .js-plotly-plot .scatterlayer .trace').length > 0")
    (ARTIFACTS / "slider-latency.json").write_text(json.dumps(
        {"slider_to_first_steered_token_ms": latencies, "median_ms": statistics.median(latencies)}, indent=1))
    print(f"\nslider -> first steered token on screen: median {statistics.median(latencies):.0f} ms, {latencies}")

    # save (as a researcher would; otherwise Lab reloads the file without outputs), reload: the plot
    # still shows its data and the streamed text is back, rebuilt from the live kernel's widget state
    page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
    _menu_click(page, "File", "Save Notebook")
    page.wait_for_function("() => !document.querySelector('.lm-TabBar-tab.jp-mod-dirty')", timeout=60_000)
    for attempt in range(2):
        page.reload()
        page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
        try:
            _scroll_to(page, ".wb-norms .js-plotly-plot", timeout=90)
            break
        except AssertionError:
            # seen once in four fresh-clone runs: the widget views did not come back after one reload
            page.screenshot(path=str(ARTIFACTS / f"lab-reload-{attempt}-failed.png"))
            print(f"\nreload {attempt}: the workbench plots did not render; reloading again")
            if attempt == 1:
                raise
    page.wait_for_function("() => document.querySelectorAll('.wb-norms .js-plotly-plot .scatterlayer .trace').length > 0",
                           timeout=60_000)
    assert _plot_traces(page, ".wb-norms") >= 2
    assert len(_reply(page, "steered")) > 20 and len(_reply(page, "baseline")) > 20
    _assert_no_widget_errors(page)
    page.locator(".wb-norms").first.scroll_into_view_if_needed()
    page.locator(".wb-norms").first.screenshot(path=str(ARTIFACTS / "lab-4-after-reload.png"))
    page.close()


def test_quickstart_renders_in_voila(browser, tmp_path_factory):
    tmp = _workdir(tmp_path_factory.mktemp("voila"))
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "voila"), "notebooks/01_quickstart.ipynb", "--no-browser",
           f"--port={port}", "--Voila.ip=127.0.0.1", "--ServerApp.ip=127.0.0.1"]
    proc = _start(cmd, tmp, _env(tmp), None)   # Voila runs the whole notebook before its page answers
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(f"http://127.0.0.1:{port}/", timeout=600_000)
        page.locator(".wb-picker input[type='text']").first.wait_for(timeout=600_000)
        page.locator(".wb-chat .wb-message textarea").first.fill("Say hello in one sentence.")
        page.locator(".wb-chat .wb-send").first.click()
        try:
            page.wait_for_function("() => [...document.querySelectorAll('.wb-stream')].every(e => "
                                   "(e.textContent.split('Assistant: ')[1] || '').length > 10)", timeout=180_000)
        except Exception as exc:
            page.screenshot(path=str(ARTIFACTS / "voila-no-reply.png"), full_page=True)
            streams = page.evaluate("() => [...document.querySelectorAll('.wb-stream, .wb-status')].map(e => e.textContent)")
            raise AssertionError(f"no reply in Voila; panels: {streams}; Voila's log: {_log_tail(proc)}") from exc
        page.wait_for_function("() => document.querySelectorAll('.wb-norms .js-plotly-plot .scatterlayer .trace').length > 0",
                               timeout=180_000)
        page.screenshot(path=str(ARTIFACTS / "voila.png"), full_page=True)
        _assert_no_widget_errors(page)
        assert page.locator(".wb-dials input[type='checkbox']").count() == 1
        assert "STEERED" in page.content()   # the notebook's own printed output is there too
        page.close()
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def lab_unwindowed(tmp_path_factory):
    """A JupyterLab that renders every cell (windowing off), so panels in the middle of a long notebook
    stay in the page while later cells run."""
    tmp = _workdir(tmp_path_factory.mktemp("lab06"))
    tracker = tmp / "lab-settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    yield from _serve_lab(tmp)


_POINTS = """(sel) => [...document.querySelectorAll(sel + ' .js-plotly-plot .scatterlayer .trace')]
                 .map(t => t.querySelectorAll('.points path').length)"""


def test_monitoring_notebook_in_jupyterlab(lab_unwindowed, browser):
    """notebooks/06_monitoring.ipynb run in Lab: the Monitor panel's lines, the logit lens heatmap, and the
    Workbench's monitor filled from a steered reply streamed in the browser."""
    started = time.monotonic()
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.set_default_timeout(60_000)
    page.goto(f"{lab_unwindowed}/lab/tree/notebooks/06_monitoring.ipynb?token={TOKEN}")
    page.locator(".jp-Notebook").first.wait_for()
    _run_all(page)
    try:
        page.locator(".wb-workbench .wb-chat .wb-send").first.wait_for(timeout=400_000)   # the last cell ran
        page.wait_for_function(f"() => ({_POINTS})('.jp-Cell .wb-monitor').some(n => n > 10)", timeout=60_000)
        page.wait_for_function("() => document.querySelectorAll('.wb-lens .js-plotly-plot .heatmaplayer image').length > 0",
                               timeout=60_000)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "lab06-0-failed.png"), full_page=True)
        raise
    ran = time.monotonic() - started
    _assert_no_widget_errors(page)
    assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                        has_text="Traceback").count() == 0
    # the standalone MonitorPanel: a line per probe with its points, message starts, reply and threshold drawn
    monitor = page.locator(".wb-monitor").first
    monitor.scroll_into_view_if_needed()
    points = page.evaluate(_POINTS, ".jp-Cell .wb-monitor:not(.wb-workbench .wb-monitor)")
    assert len(points) == 2 and all(n > 20 for n in points), points
    assert monitor.locator(".shapelayer path").count() >= 4          # 2 message starts, the reply, the threshold
    assert "2 probes" in (monitor.text_content() or "")
    monitor.screenshot(path=str(ARTIFACTS / "lab06-1-monitor.png"))
    lens = page.locator(".wb-lens").first
    lens.scroll_into_view_if_needed()
    assert "30 layers" in (lens.text_content() or "")
    lens.screenshot(path=str(ARTIFACTS / "lab06-2-lens.png"))
    # the Workbench: the steered reply streams with the dial feature watched, drawn in its monitor panel
    bench = ".wb-workbench"
    assert page.evaluate(_POINTS, f"{bench} .wb-monitor") == []
    page.locator(f"{bench} .wb-chat .wb-message textarea").first.fill(TOKYO)
    page.locator(f"{bench} .wb-chat .wb-send").first.click()
    page.wait_for_function(f"() => ({_POINTS})('{bench} .wb-monitor').some(n => n > 20)", timeout=180_000)
    page.locator(f"{bench} .wb-chat .wb-stop[disabled]").first.wait_for(timeout=180_000)
    page.wait_for_function(f"""() => {{ const t = document.querySelector('{bench} .wb-monitor').textContent;
                                        return t.includes('reply positions') && !t.includes('streaming'); }}""",
                           timeout=60_000)
    [n] = page.evaluate(_POINTS, f"{bench} .wb-monitor")
    assert n > 60, n                                     # the prompt's tokens and the reply's
    page.locator(f"{bench} .wb-monitor").first.scroll_into_view_if_needed()
    page.locator(f"{bench} .wb-monitor").first.screenshot(path=str(ARTIFACTS / "lab06-3-workbench-monitor.png"))
    _assert_no_widget_errors(page)
    print(f"\nnotebook 06 ran in Lab in {ran:.0f} s; workbench monitor: {n} points")
    page.close()
