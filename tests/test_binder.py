"""binder/ works without Docker: a fresh venv installs binder/requirements.txt from the repo root
(as repo2docker does) and runs postBuild; the result imports, has the model and the Lab settings."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_binder_requirements_and_postbuild_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "binder-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}", VIRTUAL_ENV=str(venv), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", "binder/requirements.txt"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=1500)
    assert install.returncode == 0, install.stderr[-3000:]
    build = subprocess.run(["bash", "binder/postBuild"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    check = subprocess.run([str(py), "-c", "import sys, workbench as wb, widgets, jupyterlab, voila; "
                            "print(wb.resolve_model('default')); print(sys.prefix)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    folder, prefix = check.stdout.split()
    assert (Path(folder) / "config.json").is_file()
    overrides = Path(prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    assert '"fetchNews": "false"' in overrides.read_text()
    assert (ROOT / "binder" / "runtime.txt").read_text().strip() == "python-3.11"
