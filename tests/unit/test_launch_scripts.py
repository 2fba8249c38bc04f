"""Launch scripts that must behave on any machine."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_says_so_and_succeeds_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}    # also on a GPU machine: the CPU-only path
    proc = subprocess.run(["bash", "launch/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU is visible here" in proc.stdout


def test_launch_scripts_parse():
    for script in sorted((REPO / "launch").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
