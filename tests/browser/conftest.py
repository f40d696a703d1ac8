"""The notebooks as a user sees them: the project's own JupyterLab, driven by headless Chromium.

One JupyterLab server per test session (`jupyter_lab` fixture) and one browser (`browser`).
Both are skipped, with a message saying how to enable them, when Debian's Chromium or Python
Playwright is missing; nothing here downloads a browser.

    pytest -m browser                  # only these tests
    pytest -m "not browser"            # everything else
    FA2LAB_CHROMIUM=/path/to/chrome    # another Chromium binary (default /usr/bin/chromium)
    FA2LAB_BROWSER_TIMEOUT=600         # seconds one notebook may take to run all its cells
    FA2LAB_BROWSER_MOVE_TIMEOUT=30     # seconds one control's update may take

Screenshots and JSON reports of what the tests saw: results/browser/ (not committed).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("FA2LAB_CHROMIUM", "/usr/bin/chromium"))
# The flags known to work on these machines: without the background-networking ones, Chromium
# keeps trying to reach Google's hosts through a closed network. Playwright adds a fresh, empty
# --user-data-dir of its own to every launch (passing one here is an error in launch()).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HINT_CHROMIUM = "`apt-get install chromium` (or FA2LAB_CHROMIUM=/path/to/chromium)"
HINT_PLAYWRIGHT = ("`.venv/bin/pip install playwright` (no `playwright install`: the tests drive "
                   "the system Chromium)")

# JupyterLab settings for the test server only (its own user-settings dir, never the user's):
# - autosave off: running a notebook must never write its outputs back into notebooks/;
# - windowing off: every cell stays in the DOM, so every output can be checked;
# - the notebook's kernel starts without the "Select Kernel" dialog;
# - no news or update checks: the network is closed, and their pop-ups cover the page.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none", "autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}


def pytest_configure(config):
    # Registered here too so the marker works before pyproject.toml lists it.
    if not any(str(m).startswith("browser:") for m in config.getini("markers")):
        config.addinivalue_line("markers", "browser: drives JupyterLab in headless Chromium "
                                           "(skipped without chromium and playwright)")


def _missing() -> str | None:
    """Why the browser tests cannot run here and how to enable them, or None."""
    problems, steps = [], []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"no Chromium at {CHROMIUM}")
        steps.append(HINT_CHROMIUM)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("Python package playwright is not installed")
        steps.append(HINT_PLAYWRIGHT)
    if not problems:
        return None
    return "browser tests skipped: " + "; ".join(problems) + ". To run them: " + " and ".join(steps)


@pytest.fixture(scope="session")
def browser_requirements():
    reason = _missing()
    if reason:
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """preexec_fn: the server gets SIGTERM when pytest dies, even by SIGKILL (Linux only)."""
    os.setsid()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class JupyterLab:
    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path
    log: Path
    process: subprocess.Popen

    def lab_url(self, path: str, workspace: str) -> str:
        """The JupyterLab page of a file (relative to the server root) in a workspace of its own:
        the default workspace would reopen every notebook opened before, each with its kernel."""
        return f"{self.url}/lab/workspaces/{workspace}/tree/{path}?reset&token={self.token}"

    def kernel(self, path: str) -> dict | None:
        """The kernel of the notebook at `path` (id, execution_state, last_activity), if any."""
        for s in self.api("GET", "/api/sessions"):
            if s.get("path") == path and s.get("kernel"):
                return s["kernel"]
        return None

    def api(self, method: str, path: str):
        """Call the REST API; returns the decoded JSON (None for empty answers)."""
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Shut down every kernel (closing a notebook's tab leaves its kernel running)."""
        for k in self.api("GET", "/api/kernels"):
            with contextlib.suppress(urllib.error.URLError):
                self.api("DELETE", f"/api/kernels/{k['id']}")

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


def _start_lab(tmp: Path) -> JupyterLab:
    """Start JupyterLab on a free port and wait until its API answers. The port is chosen here
    and port retries are off, so a port taken in between makes the start fail (and retry),
    rather than leave the server somewhere else."""
    jupyter = Path(sys.prefix) / "bin" / "jupyter"
    if not jupyter.exists():
        pytest.fail(f"{jupyter} not found: the browser tests start the project's own JupyterLab")
    settings = tmp / "lab-user-settings"
    for rel, values in LAB_SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(values))
    # Fresh Jupyter/IPython dirs: the user's config, kernelspecs (a `python3` kernelspec in
    # ~/.local/share/jupyter would run another Python), workspaces and runtime files stay out.
    env = dict(os.environ)
    for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")]:
        (tmp / sub).mkdir(exist_ok=True)
        env[var] = str(tmp / sub)
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_CONFIG_PATH", None)
    env["JUPYTER_PLATFORM_DIRS"] = "0"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # silences a debugger warning on stderr

    last_error = ""
    for attempt in range(3):
        port, token = _free_port(), secrets.token_hex(24)
        log = tmp / f"jupyterlab-{attempt}.log"
        cmd = [str(jupyter), "lab", "--no-browser",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={REPO}",
               f"--LabApp.user_settings_dir={settings}",
               f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
               f"--FileCheckpoints.checkpoint_dir={tmp / 'checkpoints'}",  # not notebooks/.ipynb_checkpoints
               "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # CI containers run as root; Jupyter refuses it otherwise
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        lab = JupyterLab(f"http://127.0.0.1:{port}", token, REPO, log, proc)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                lab.api("GET", "/api/status")
                return lab
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        last_error = lab.log_tail()
        _stop_lab(lab, tmp)
    pytest.fail(f"JupyterLab did not start (3 attempts); last log:\n{last_error}")


def _stop_lab(lab: JupyterLab, tmp: Path) -> None:
    """Stop the server whatever state it is in: kernels through the API, then the server's
    process group (SIGTERM, then SIGKILL), then any kernel still using this session's runtime
    dir (jupyter_client starts kernels in sessions of their own, outside the server's group)."""
    if lab.process.poll() is None:
        with contextlib.suppress(Exception):
            lab.shutdown_kernels()
    for sig, wait in [(signal.SIGTERM, 15), (signal.SIGKILL, 5)]:
        if lab.process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(lab.process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            lab.process.wait(wait)
    runtime = str(tmp / "runtime")
    for proc_dir in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if runtime in cmdline and int(proc_dir.name) != os.getpid():
                os.kill(int(proc_dir.name), signal.SIGKILL)


TMP_PREFIX = "fa2lab-browser-"


def _remove_stale_dirs() -> None:
    """Remove the temporary dirs of earlier sessions whose pytest is gone (killed with SIGKILL,
    it could not clean up; its server and kernels went with it, see _die_with_parent)."""
    for d in Path(tempfile.gettempdir()).glob(TMP_PREFIX + "*"):
        try:
            os.kill(int((d / "owner.pid").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            pass  # no pid file yet, or not ours to judge


@pytest.fixture(scope="session")
def jupyter_lab(browser_requirements):
    """The project's JupyterLab on 127.0.0.1, a free port and a random token; stopped at the end
    of the session whatever happens."""
    _remove_stale_dirs()
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    (tmp / "owner.pid").write_text(str(os.getpid()))
    lab = _start_lab(tmp)
    try:
        yield lab
    finally:
        _stop_lab(lab, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def browser(browser_requirements):
    """Headless Debian Chromium under Python Playwright (sync API)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def results_dir() -> Path:
    d = REPO / "results" / "browser"
    d.mkdir(parents=True, exist_ok=True)
    return d
