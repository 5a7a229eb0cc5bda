"""`run_and_exit`: a command ends the way the interpreter would end it (threads joined, atexit handlers run, output
flushed, the exit status kept), without the module teardown that costs 0.3-0.6 s after every `diffractflow` run."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from diffractflow.cli import run_and_exit

    out = Path(sys.argv[1])

    def app():
        def late():  # a non-daemon thread the interpreter would wait for
            time.sleep(0.3)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()
        pool = ThreadPoolExecutor(2)  # never shut down: its idle workers must be told to stop, as at a normal exit
        pool.submit(time.sleep, 0.01).result()
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        sys.stdout.write("unflushed output")  # no newline, no flush: must still reach the pipe
        if sys.argv[2] == "message":
            sys.exit("fatal: the message")
        if sys.argv[2] == "raise":
            raise ValueError("a bug")
        sys.exit(int(sys.argv[2]))

    run_and_exit(app)
''')


@pytest.mark.parametrize("how, status", [("0", 0), ("3", 3), ("message", 1)])
def test_exit_joins_threads_runs_atexit_flushes_and_keeps_the_status(tmp_path, how, status):
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), how], capture_output=True, text=True, timeout=60)
    assert p.returncode == status, p.stderr
    assert p.stdout == "unflushed output"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"
    if how == "message":
        assert "fatal: the message" in p.stderr


def test_an_escaping_exception_keeps_its_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "raise"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1
    assert "ValueError: a bug" in p.stderr
    assert (tmp_path / "atexit").read_text() == "ran"
