"""Every notebook in notebooks/, as a user sees it: opened in the project's JupyterLab in headless
Chromium, all cells run, every output checked, every interactive control moved.

Nothing here knows what the notebooks contain. For each notebooks/*.ipynb found at collection:
- open it, Run > Run All Cells, wait until the kernel is idle and every code cell has run;
- no error anywhere on the page: tracebacks, `SomeError: ...` lines (also inside widgets),
  "No renderer could be found" (a missing front-end extension), widgets that failed to load or
  fell back to their text repr, a dialog left open (e.g. a dead kernel);
- every plotly output rendered: a `.js-plotly-plot` with `data` and drawn traces;
- every ipywidgets control (sliders, dropdowns, selects, checkboxes, toggle and radio buttons)
  rendered, and moved as a user would (keyboard on a slider's handle, another option of a
  dropdown, a click): each move must redraw the figures of its cell (or, for controls in a cell
  without figures, of the notebook) or change their data - a control that updates nothing fails -
  and in each cell with controls some move must change a figure's data (read from the page as
  `el.data`, compared as JSON; a control whose one step only redraws is moved further);
- a screenshot of the whole notebook and a JSON report go to results/browser/ (not committed).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.browser

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
RUN_TIMEOUT_S = float(os.environ.get("FA2LAB_BROWSER_TIMEOUT", "600"))  # Run All Cells, per notebook
# One control's update: the kernel rebuilds the figure, plotly redraws it (seconds here).
MOVE_TIMEOUT_S = float(os.environ.get("FA2LAB_BROWSER_MOVE_TIMEOUT", "30"))
# After the kernel has handled a control's change and gone idle: time for the page to redraw.
RENDER_GRACE_S = 5.0
VIEWPORT = {"width": 1400, "height": 1000}

# Page-side helpers, installed as window.fa2labTest once the notebook is open. Every query is
# scoped to the visible notebook panel.
HELPERS_JS = r"""
() => {
  const ERROR_LINE = /^\s*[A-Z]\w*(Error|Exception|Interrupt): /m;
  const WIDGET_REPR = /^\s*[A-Z]\w*\((children|value|description|options|layout|index)=/;
  const PLOTLY_MIME = 'application/vnd.plotly.v1+json';
  const WIDGET_MIME = 'application/vnd.jupyter.widget-view+json';
  // Elements plotly.js draws for traces, over the trace types a notebook may use.
  const DRAWN = '.trace, .hm, .contour, .imagelayer image, .gl-container canvas, .pielayer .slice, '
              + '.barlayer .point, .scatterlayer path, .treemaplayer .slice, .sunburstlayer .slice';
  const CONTROLS = [
    ['slider', '.widget-slider'],
    ['dropdown', '.widget-dropdown'],
    ['select-multiple', '.widget-select-multiple'],
    ['select', '.widget-select:not(.widget-select-multiple)'],
    ['checkbox', '.widget-checkbox'],
    ['toggle-buttons', '.widget-toggle-buttons'],
    ['toggle-button', '.widget-toggle-button'],
    ['radio', '.widget-radio'],
  ];
  const panel = () => document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const cells = () => [...panel().querySelectorAll('.jp-Notebook .jp-Cell')];
  const cellIndex = (el) => cells().indexOf(el.closest('.jp-Cell'));
  const text = (el) => (el.innerText || el.textContent || '');
  const t = {
    prompts() {
      return [...panel().querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
        .map(e => e.textContent.trim());
    },
    kernelStatus() {
      const ind = panel().querySelector('.jp-Notebook-ExecutionIndicator');
      return ind ? ind.dataset.status : null;
    },
    // started: some cell queued, running or run; done: started, none pending, kernel idle.
    runState() {
      const ps = t.prompts();
      const started = !ps.length || ps.some(p => /^\[(\*|\d+)\]:$/.test(p));  // no code: nothing to wait for
      const pending = ps.some(p => p === '[*]:');
      return {prompts: ps, started, done: started && !pending && t.kernelStatus() === 'idle'};
    },
    dialogs() {
      return [...document.querySelectorAll('.jp-Dialog')].map(d => text(d).trim().slice(0, 500));
    },
    figureInfo(el) {
      const data = Array.isArray(el.data) ? el.data : [];
      return {
        cell: cellIndex(el),
        traces: data.length,
        types: data.map(tr => tr.type || 'scatter'),
        drawn: el.querySelectorAll(DRAWN).length,
        laidOut: !!(el._fullLayout && el.querySelector('.main-svg')),
        title: (el.layout && el.layout.title && (el.layout.title.text || el.layout.title)) || '',
      };
    },
    figures(root) {
      return [...(root || panel()).querySelectorAll('.js-plotly-plot')];
    },
    figuresDrawn(root) {
      return t.figures(root).every(el => {
        const f = t.figureInfo(el);
        return f.laidOut && f.traces > 0 && f.drawn > 0;
      });
    },
    // Everything visibly wrong on the page, as messages.
    problems() {
      const out = [];
      for (const o of panel().querySelectorAll('.jp-OutputArea-output')) {
        const mime = o.dataset.mimeType || '';
        const s = text(o);
        const where = `cell ${cellIndex(o)} (${mime || 'no mime type'})`;
        if (/Traceback \(most recent call last\)/.test(s) || ERROR_LINE.test(s))
          out.push(`${where}: error output: ${s.trim().slice(0, 1500)}`);
        if (/No renderer could be found/.test(s))
          out.push(`${where}: ${s.trim().slice(0, 300)} (front-end extension missing?)`);
        if (/Error displaying widget|Loading widget/.test(s))
          out.push(`${where}: widget not rendered: ${s.trim().slice(0, 300)}`);
        if (mime === 'text/plain' && WIDGET_REPR.test(s))
          out.push(`${where}: a widget shown as text (ipywidgets front end missing?): ${s.trim().slice(0, 200)}`);
        if (mime === PLOTLY_MIME && !o.querySelector('.js-plotly-plot'))
          out.push(`${where}: plotly output without a rendered .js-plotly-plot`);
        if (mime === WIDGET_MIME && !o.querySelector('.jupyter-widgets, .widget-box, .widget-output'))
          out.push(`${where}: widget output with no rendered widget: ${s.trim().slice(0, 200)}`);
      }
      for (const el of t.figures()) {
        const f = t.figureInfo(el);
        if (!f.laidOut || f.traces === 0 || f.drawn === 0)
          out.push(`cell ${f.cell}: plotly figure ${JSON.stringify(f.title)} not drawn `
                   + `(traces ${f.traces}, drawn elements ${f.drawn}, laid out ${f.laidOut})`);
      }
      return out;
    },
    // Tag every control with data-fa2lab-control=i and describe it.
    controls() {
      const found = [];
      const seen = new Set();
      for (const [kind, sel] of CONTROLS) {
        for (const el of panel().querySelectorAll(sel)) {
          if (seen.has(el)) continue;
          seen.add(el);
          found.push([kind, el]);
        }
      }
      found.sort((a, b) => a[1].compareDocumentPosition(b[1]) & Node.DOCUMENT_POSITION_FOLLOWING ? -1 : 1);
      return found.map(([kind, el], i) => {
        el.setAttribute('data-fa2lab-control', String(i));
        // A checkbox's description sits in .widget-label-basic, its .widget-label is blank.
        const labels = [...el.querySelectorAll('.widget-label, .widget-label-basic')]
          .map(l => text(l).replace(/\u200b/g, '').trim()).filter(Boolean);
        const input = el.querySelector('input, select, button, .noUi-handle');
        return {index: i, kind, cell: cellIndex(el),
                label: (labels[0] || text(el).trim()).slice(0, 80),
                disabled: !!(input && (input.disabled || input.getAttribute('disabled') !== null))};
      });
    },
    // The figures a control drives: those of its own cell, else (controls in one cell driving a
    // figure shown in another) every figure in the notebook.
    scopeOf(i) {
      const cell = panel().querySelector(`[data-fa2lab-control="${i}"]`).closest('.jp-Cell');
      return t.figures(cell).length ? cell : panel();
    },
    snapshot(i) {
      const figs = t.figures(t.scopeOf(i));
      return {n: figs.length, data: figs.map(el => JSON.stringify(el.data))};
    },
    markSeen(i) {
      for (const el of t.figures(t.scopeOf(i))) el.__fa2labSeen = true;
    },
    // After moving control i: done when the kernel is idle and the scope's figures are drawn and
    // either redrawn (new elements) or changed; or as soon as something is wrong.
    moveSettled(args) {
      const [i, before] = args;
      if (t.problems().length) return 'problem';
      if (t.kernelStatus() !== 'idle') return false;
      const scope = t.scopeOf(i);
      const figs = t.figures(scope);
      if (!figs.length || !t.figuresDrawn(scope)) return false;
      const now = figs.map(el => JSON.stringify(el.data));
      const changed = now.length !== before.data.length || now.some((d, k) => d !== before.data[k]);
      const redrawn = figs.some(el => !el.__fa2labSeen);
      return changed ? 'changed' : (redrawn ? 'redrawn' : false);
    },
    // Scroll the notebook to its top; its full height, for a screenshot of all of it.
    notebookHeight() {
      const scroller = panel().querySelector('.jp-WindowedPanel-outer') || panel().querySelector('.jp-Notebook');
      scroller.scrollTop = 0;
      return scroller.scrollHeight;
    },
  };
  window.fa2labTest = t;
  return true;
}
"""


def _js(page, expr: str, arg=None):
    """Evaluate `fa2labTest.<expr>` in the page."""
    return page.evaluate(f"(arg) => window.fa2labTest.{expr}", arg)


def _wait(page, expr: str, timeout_s: float, arg=None):
    """Wait until `fa2labTest.<expr>` is truthy; its value, or None on time-out."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        handle = page.wait_for_function(f"(arg) => window.fa2labTest.{expr}", arg=arg,
                                        timeout=timeout_s * 1000, polling=250)
        return handle.json_value()
    except PlaywrightTimeout:
        return None


def _wait_kernel_ready(lab, page, path: str, timeout_s: float = 120) -> str | None:
    """Wait until the notebook's session has an idle kernel on the server and the page shows
    it; None, or what went wrong."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kernel = lab.kernel(path)
        if kernel and kernel.get("execution_state") == "idle":
            break
        dialogs = _js(page, "dialogs()")
        if dialogs:
            return f"a dialog opened before the run: {dialogs}"
        time.sleep(0.25)
    else:
        return f"no idle kernel after {timeout_s:.0f} s; server log:\n{lab.log_tail()}"
    page.wait_for_function(
        "() => /\\|\\s*Idle/.test(document.querySelector('#jp-main-statusbar')?.innerText || '')",
        timeout=timeout_s * 1000)
    return None


def _run_all(page) -> None:
    """Run > Run All Cells, as a user would."""
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").first.click()
    page.locator("#jp-menu-panel .lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).click()
    page.locator('.lm-Menu-item:has(.lm-Menu-itemLabel:text-is("Run All Cells"))').click()


MAX_ATTEMPTS = 3  # moves of one control while its figures redraw with the same data


def _move(page, control: dict, attempt: int) -> tuple[str, bool] | None:
    """Move one control as a user would. Attempt 0 is the smallest move (one slider step, the
    next option); later attempts (made while the figures redraw with the same data, e.g. a
    slider whose next value changes nothing) go further: a slider to its ends, other options.
    Returns (what was done, whether the control's own state changed in the page: False means
    the harness, not the notebook, failed to move it), or None when there is no other move."""
    loc = page.locator(f'[data-fa2lab-control="{control["index"]}"]')
    kind = control["kind"]
    if kind == "slider":
        handle = loc.locator(".noUi-handle").first
        before = handle.get_attribute("aria-valuenow")
        now = float(before or "nan")
        lo, hi = (float(handle.get_attribute(a) or "nan") for a in ("aria-valuemin", "aria-valuemax"))
        if attempt == 0:
            key = "ArrowLeft" if now >= hi else "ArrowRight"  # one step
        elif attempt < MAX_ATTEMPTS:
            key = "Home" if (attempt == 1) == (now != lo) else "End"  # one end, then the other
        else:
            return None
        handle.focus()
        handle.press(key)  # noUiSlider moves, then fires its change event (continuous_update or not)
        after = handle.get_attribute("aria-valuenow")
        return f"{key} on the handle: {before} -> {after}", after != before
    if kind in ("dropdown", "select"):
        select = loc.locator("select").first
        n, current = select.evaluate("s => [s.options.length, s.selectedIndex]")
        if n < 2 or attempt >= min(MAX_ATTEMPTS, n - 1):
            return ("skip: one option only", True) if n < 2 and attempt == 0 else None
        select.select_option(index=(current + 1) % n)
        after = select.evaluate("s => s.selectedIndex")
        return f"option {current} -> {after} of {n}", after != current
    if kind == "select-multiple":
        select = loc.locator("select").first
        n, chosen = select.evaluate("s => [s.options.length, [...s.selectedOptions].map(o => o.index)]")
        if n < 2 or attempt >= min(MAX_ATTEMPTS, n):
            return ("skip: one option only", True) if n < 2 and attempt == 0 else None
        if attempt == 0:  # one option fewer, or one more
            target = chosen[:-1] if len(chosen) > 1 else sorted({*chosen, next(i for i in range(n) if i not in chosen)})
        else:  # a single option
            target = [(attempt - 1) % n]
        select.select_option(index=target)
        after = select.evaluate("s => [...s.selectedOptions].map(o => o.index)")
        return f"selection {chosen} -> {after}", after != chosen
    if kind in ("checkbox", "toggle-button") and attempt > 0:
        return None  # two states: the first move showed both
    if attempt >= MAX_ATTEMPTS:
        return None
    state = ("el => [...el.querySelectorAll('input, button')].map(e => e.checked || e.classList.contains('mod-active'))"
             if kind != "toggle-button" else "e => e.classList.contains('mod-active')")
    before = loc.evaluate(state)
    if kind == "checkbox":
        loc.locator("input[type=checkbox]").first.click()
    elif kind == "toggle-buttons":
        loc.locator("button:not(.mod-active)").first.click()
    elif kind == "toggle-button":
        loc.click()
    elif kind == "radio":
        loc.locator("input[type=radio]:not(:checked)").first.click()
    else:
        return (f"skip: unknown kind {kind}", True) if attempt == 0 else None
    after = loc.evaluate(state)
    return f"clicked: {before} -> {after}", after != before


def _settle(lab, page, path, index, before, activity, timeout_s) -> tuple[str | None, str]:
    """After a control moved: ("changed" | "redrawn" | "problem" | None, what the kernel did).
    Waits for the figures to update, but not the whole timeout when nothing will: once the kernel
    has handled the change (its last_activity moved on) and is idle again, the front end gets
    RENDER_GRACE_S to show the result."""
    deadline = time.monotonic() + timeout_s
    handled_at = None
    while True:
        outcome = _js(page, "moveSettled(arg)", [index, before])
        if outcome:
            return outcome, "kernel handled the change"
        now = time.monotonic()
        if handled_at is None:
            kernel = lab.kernel(path) or {}
            if kernel.get("last_activity") != activity and kernel.get("execution_state") == "idle":
                handled_at = now
        if handled_at is not None and now - handled_at > RENDER_GRACE_S:
            return None, f"the kernel handled the change and was idle for {RENDER_GRACE_S:.0f} s"
        if now > deadline:
            return None, ("the kernel " + ("handled the change" if handled_at else "saw no activity")
                          + f" within {timeout_s:.0f} s")
        time.sleep(0.25)


def _screenshot(page, path: Path) -> None:
    """The whole notebook: a viewport as tall as the notebook (JupyterLab scrolls inside a panel,
    so a full-page screenshot would show only the first screen)."""
    try:
        height = int(_js(page, "notebookHeight()"))
        page.set_viewport_size({"width": VIEWPORT["width"],
                                "height": max(VIEWPORT["height"], min(height + 200, 20000))})
        page.wait_for_timeout(1000)  # plotly relayouts on resize
        _js(page, "notebookHeight()")
    except Exception:  # noqa: BLE001 - a screenshot of what there is beats none
        pass
    page.screenshot(path=str(path))


def exercise_notebook(lab, browser, rel: str, out_dir: Path, move_timeout_s: float = MOVE_TIMEOUT_S) -> dict:
    """Open notebook `rel` (relative to the server root) in JupyterLab, run it, check it, move
    every control. Returns a report whose "failures" lists everything wrong (empty: all good);
    writes <stem>.png and <stem>.json to out_dir."""
    stem = Path(rel).stem
    report = {"notebook": rel, "failures": [], "controls": [], "figures": [],
              "console_errors": [], "page_errors": []}
    fail = report["failures"].append
    started = time.monotonic()
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.on("console", lambda m: m.type == "error" and report["console_errors"].append(m.text[:500]))
    page.on("pageerror", lambda e: report["page_errors"].append(str(e)[:500]))
    try:
        workspace = re.sub(r"[^A-Za-z0-9_-]", "-", f"fa2lab-test-{stem}-{os.getpid()}-{time.time_ns()}")
        page.goto(lab.lab_url(rel, workspace), wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell", timeout=120_000)
        page.evaluate(HELPERS_JS)
        problem = _wait_kernel_ready(lab, page, rel)
        if problem:
            fail(problem)
            return report
        try:  # room for the notebook: collapse the file browser (cosmetic, for the screenshot)
            page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").click(timeout=2000)
        except Exception:  # noqa: BLE001
            pass
        report["open_s"] = round(time.monotonic() - started, 1)

        t0 = time.monotonic()
        _run_all(page)
        state = _wait(page, "runState().done && fa2labTest.runState()", RUN_TIMEOUT_S)
        report["run_s"] = round(time.monotonic() - t0, 1)
        if state is None:
            fail(f"Run All Cells did not finish within {RUN_TIMEOUT_S:.0f} s (FA2LAB_BROWSER_TIMEOUT "
                 f"raises it): prompts {_js(page, 'prompts()')}, kernel {_js(page, 'kernelStatus()')}, "
                 f"problems {_js(page, 'problems()')}, dialogs {_js(page, 'dialogs()')}")
            return report
        # Outputs render after the kernel is idle (plotly.js loads lazily): let them settle.
        _wait(page, "figuresDrawn() && !fa2labTest.problems().length", 30)
        report["figures"] = page.evaluate("() => fa2labTest.figures().map(el => fa2labTest.figureInfo(el))")
        for p in _js(page, "problems()") + [f"dialog open: {d}" for d in _js(page, "dialogs()")]:
            fail(f"after Run All Cells: {p}")
        not_run = [i for i, p in enumerate(state["prompts"]) if not re.fullmatch(r"\[\d+\]:", p)]
        if not_run:
            fail(f"code cells {not_run} (0-based, code cells only) did not run: prompts {state['prompts']}")
        if report["failures"]:
            return report  # moving controls over broken outputs would only repeat the errors

        # Every control: each move must update its figures (redraw them or change their data);
        # in each cell with controls, some move must change a figure's data. A control whose move
        # only redrew is moved further (MAX_ATTEMPTS) until its cell's data changes.
        t1 = time.monotonic()
        changed_cells, moved_cells = set(), set()
        for c in _js(page, "controls()"):
            entry = dict(c, moves=[])
            report["controls"].append(entry)
            name = f"{c['kind']} {c['label']!r} (cell {c['cell']})"
            if c["disabled"]:
                entry["outcome"] = "skip: disabled"
                continue
            for attempt in range(MAX_ATTEMPTS):
                if attempt and c["cell"] in changed_cells:
                    break
                before = _js(page, "snapshot(arg)", c["index"])
                _js(page, "markSeen(arg)", c["index"])
                activity = (lab.kernel(rel) or {}).get("last_activity")
                t = time.monotonic()
                move = _move(page, c, attempt)
                if move is None:
                    break
                action, moved = move
                if action.startswith("skip"):
                    entry["outcome"] = action
                    break
                if not moved:
                    fail(f"{name}: the browser could not move it ({action})")
                    break
                moved_cells.add(c["cell"])
                outcome, kernel = _settle(lab, page, rel, c["index"], before, activity, move_timeout_s)
                entry["moves"].append({"action": action, "outcome": outcome or "nothing",
                                       "seconds": round(time.monotonic() - t, 2), "kernel": kernel})
                entry["outcome"] = outcome or "nothing"
                problems = _js(page, "problems()") + [f"dialog open: {d}" for d in _js(page, "dialogs()")]
                if problems:
                    fail(f"after moving {name} ({action}):\n  " + "\n  ".join(problems))
                    break
                if outcome not in ("changed", "redrawn"):
                    fail(f"moving {name} ({action}) updated no figure: the {before['n']} figure(s) it "
                         f"should drive kept their data and were not redrawn ({kernel})")
                    break
                if outcome == "changed":
                    changed_cells.add(c["cell"])
            if report["failures"] and any(f.startswith("after moving") for f in report["failures"]):
                break  # an error on the page: later moves would only repeat it
        report["controls_s"] = round(time.monotonic() - t1, 1)
        for cell in sorted(moved_cells - changed_cells):
            if not any(c["cell"] == cell and c.get("outcome") == "nothing" for c in report["controls"]):
                fail(f"cell {cell}: its controls redrew the figures, but no move of any of them "
                     f"(up to {MAX_ATTEMPTS} each) changed the figures' data")
        report["figures_after_moves"] = page.evaluate(
            "() => fa2labTest.figures().map(el => fa2labTest.figureInfo(el))")
        for e in report["page_errors"]:
            fail(f"uncaught JavaScript error in the page: {e}")
        return report
    finally:
        report["total_s"] = round(time.monotonic() - started, 1)
        try:
            _screenshot(page, out_dir / f"{stem}.png")
        except Exception as exc:  # noqa: BLE001
            report["screenshot_error"] = str(exc)
        (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        context.close()
        lab.shutdown_kernels()


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_in_jupyterlab(notebook, jupyter_lab, browser, results_dir):
    if not notebook.exists():
        pytest.skip(f"{notebook.name} was removed after collection")
    report = exercise_notebook(jupyter_lab, browser, notebook.relative_to(REPO).as_posix(), results_dir)
    assert not report["failures"], (
        f"{notebook.name} in JupyterLab (screenshot and report: results/browser/{notebook.stem}.png/.json):\n- "
        + "\n- ".join(report["failures"]))


# The harness itself, on a notebook it writes: a control that works (an ipywidgets Output redrawn
# from the callback), one whose single step redraws the same data (moved further until the data
# changes), and one that updates nothing in JupyterLab (IPython's display-id update from a
# widget callback: JupyterLab drops update_display_data that is not part of a cell's execution;
# fa2lab's explore() did this for a while).
SELFTEST_CELLS = [
    """import ipywidgets as widgets, plotly.graph_objects as go, plotly.io as pio
from IPython.display import display
pio.renderers.default = "plotly_mimetype"
def fig(n):
    return go.Figure(go.Scatter(x=list(range(n)), y=[i * i for i in range(n)]), layout=dict(title=f"n={n}"))""",
    """working = widgets.IntSlider(value=5, min=2, max=20, continuous_update=False, description="working")
out = widgets.Output()
def redraw(change=None):
    out.clear_output(wait=True)
    with out:
        display(fig(working.value))
working.observe(redraw, names="value")
redraw()
display(widgets.VBox([working, out]))""",
    """coarse = widgets.IntSlider(value=550, min=0, max=1000, continuous_update=False, description="coarse")
out2 = widgets.Output()
def redraw2(change=None):  # one step redraws the same data; the slider's ends change it
    out2.clear_output(wait=True)
    with out2:
        display(fig(2 + coarse.value // 100))
coarse.observe(redraw2, names="value")
redraw2()
display(widgets.VBox([coarse, out2]))""",
    """dead = widgets.IntSlider(value=5, min=2, max=20, continuous_update=False, description="dead")
display(dead)
handle = display(fig(dead.value), display_id=True)
dead.observe(lambda change: handle.update(fig(dead.value)), names="value")""",
]


def test_harness_catches_a_control_that_updates_nothing(jupyter_lab, browser, results_dir):
    nbformat = pytest.importorskip("nbformat")
    folder = results_dir / "selftest"
    folder.mkdir(exist_ok=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in SELFTEST_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "dead_control.ipynb"
    nbformat.write(nb, path)
    report = exercise_notebook(jupyter_lab, browser, path.relative_to(REPO).as_posix(), folder)
    outcomes = {c["label"]: [m["outcome"] for m in c["moves"]] for c in report["controls"]}
    assert outcomes == {"working": ["changed"], "coarse": ["redrawn", "changed"], "dead": ["nothing"]}, report
    assert len(report["failures"]) == 1 and "'dead'" in report["failures"][0], report["failures"]
