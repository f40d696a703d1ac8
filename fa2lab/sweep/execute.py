"""Executing one notebook with papermill, in this process or in a child process.

With one job the runner calls papermill here, in its main thread: Ctrl-C lands there and papermill
shuts the kernel down. With several, each point runs in a child process
(`python fa2lab/sweep/execute.py REQUEST`) that a thread of the runner waits on: papermill is not
safe to drive from several threads of one process, Ctrl-C reaches the children too (kernels run
in a session of their own and are shut down by papermill), and a crash of papermill cannot take
the runner down. A child watches its parent: when the runner dies (even by SIGKILL, which runs no
clean-up) the child interrupts its notebook, papermill shuts the kernel down, and the child exits,
so no point keeps running for a runner that is gone.
"""

from __future__ import annotations

import _thread
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ERROR_PREFIX = "fa2lab-sweep-error: "


class PointError(RuntimeError):
    """A point's notebook failed; the message is the notebook's own exception."""


def error_text(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:  # papermill.PapermillExecutionError: the notebook's own exception
        return f"{ename}: {evalue} (cell {getattr(exc, 'exec_count', '?')})"
    return f"{type(exc).__name__}: {exc}"


def execute_notebook(notebook, output, parameters: dict, *, cwd, timeout_s: int) -> None:
    """papermill in this process: run `notebook` with `parameters` injected after its parameters
    cell, saving the executed copy at `output` (also when a cell fails), without widget state."""
    import papermill

    # The kernel's own log (e.g. ipykernel's warning about unencrypted local TCP) would interleave
    # with the progress bar; errors in the notebook still arrive as exceptions.
    papermill.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(cwd),
                               progress_bar=False, execution_timeout=timeout_s, store_widget_state=False,
                               extra_arguments=["--IPKernelApp.log_level=ERROR"])


def execute_in_subprocess(notebook, output, parameters: dict, *, cwd, timeout_s: int, env: dict | None = None) -> None:
    """The same in a child process (environment: this one's, updated with `env`); raises
    PointError with the notebook's exception, or KeyboardInterrupt when the child was interrupted."""
    request = json.dumps(dict(notebook=str(notebook), output=str(output), parameters=parameters, cwd=str(cwd),
                              timeout_s=timeout_s, parent_pid=os.getpid()))
    # Run as a script, not `-m fa2lab.sweep.execute`: that would import the fa2lab package, and torch
    # with it, in a process that needs only papermill.
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), request], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **env) if env else None)
    _note_child(proc.pid)
    try:
        _, stderr = proc.communicate()
    except BaseException:  # Ctrl-C here: the child got it too; wait for it to shut its kernel down
        proc.wait()
        raise
    if proc.returncode == 0:
        return
    if proc.returncode in (-2, 130):  # SIGINT: Ctrl-C reached the child too
        raise KeyboardInterrupt
    lines = [ln for ln in stderr.splitlines() if ln.startswith(ERROR_PREFIX)]
    if lines:
        raise PointError(lines[-1][len(ERROR_PREFIX):])
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    raise PointError(f"papermill process exited with {proc.returncode}: {tail}")


def _note_child(pid: int) -> None:
    """List the child in the lock of the point it runs (fa2lab.sweep.lock), if the runner holds one."""
    lock = sys.modules.get("fa2lab.sweep.lock")
    if lock is not None:
        lock.note_child(pid)


def watch_parent(parent_pid: int, grace_s: float = 20.0, poll_s: float = 0.5) -> threading.Thread:
    """Interrupt this process's main thread when `parent_pid` is no longer its parent (the parent
    died: the child was re-parented), and exit after `grace_s` if that did not end it."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        _thread.interrupt_main()  # KeyboardInterrupt in papermill: it shuts the kernel down
        time.sleep(grace_s)
        os._exit(130)

    thread = threading.Thread(target=watch, name="fa2lab-watch-parent", daemon=True)
    thread.start()
    return thread


def main(argv=None) -> int:
    req = json.loads((sys.argv[1:] if argv is None else argv)[0])
    if req.get("parent_pid"):
        watch_parent(int(req["parent_pid"]))
    try:
        execute_notebook(Path(req["notebook"]), Path(req["output"]), req["parameters"], cwd=req["cwd"],
                         timeout_s=req["timeout_s"])
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - handed to the parent on stderr
        if getattr(exc, "ename", None) == "KeyboardInterrupt":
            return 130
        print(ERROR_PREFIX + error_text(exc).replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
