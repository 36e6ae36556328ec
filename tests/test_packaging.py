"""The package as a user installs it: a wheel, not the source tree."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO


@pytest.mark.slow
def test_wheel_installs_and_runs_the_demo_outside_the_repository(tmp_path):
    """Build a wheel, install it (non-editable) into a fresh virtual environment and run a
    short demo from a folder outside the repository: the shipped configs must come along."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob("retinanet-*.whl"))

    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    # the heavy dependencies (torch, ...) come from the test environment, not the network;
    # a plain path line: the editable install's finder there is not activated
    (fresh_site / "test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run([str(python), "-c", "import retinanet; print(retinanet.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert where.startswith(str(fresh_site)), where
    demo = subprocess.run([str(env_dir / "bin" / "retinanet"), "demo", "--minutes", "0.2", "--num-train", "40",
                           "--num-val", "10"], cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    result = json.loads((work / "demo_output" / "demo_result.json").read_text())
    assert result["status"] == "finished" and result["iterations"] > 0 and 0.0 <= result["AP"] <= 1.0
    run_config = (work / "demo_output" / "run" / "config.yaml").read_text()
    assert "adamw" in run_config  # the demo recipe came from the shipped demo.yaml, not the COCO defaults
