"""The README's set-up commands: `make lab` starts JupyterLab on the quickstart notebook."""

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import free_port, stop_process

ROOT = Path(__file__).parent.parent


def test_make_lab_starts_jupyterlab(tmp_path):
    port, token = free_port(), "workbench-test-token"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        ["make", "lab", f"LAB_PORT={port}", f"LAB_ARGS=--no-browser --IdentityProvider.token={token}"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    try:
        status, deadline = None, time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {token}"})
                status = json.load(urllib.request.urlopen(req, timeout=2))
                break
            except OSError:
                time.sleep(0.5)
        assert status is not None, (tmp_path / "lab.log").read_text()[-3000:]
        assert "started" in status
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/contents/notebooks/01_quickstart.ipynb?content=0",
                                     headers={"Authorization": f"token {token}"})
        assert json.load(urllib.request.urlopen(req, timeout=5))["type"] == "notebook"
        # the landing page is the quickstart notebook
        opened = urllib.request.urlopen(f"http://127.0.0.1:{port}/?token={token}", timeout=10)
        assert opened.geturl().split("?")[0].endswith("/lab/tree/notebooks/01_quickstart.ipynb")
    finally:
        stop_process(proc)
        log.close()
