"""Several real processes forming one mesh over gloo, as launch/local.py starts them."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAT = ["generate", "--chat", "--prompt=What is the capital of France?", "--max_tokens=24"]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def test_two_processes_of_three_devices_print_what_one_process_prints():
    launched = subprocess.run(
        [
            sys.executable,
            "launch/local.py",
            "--num_processes=2",
            "--devices_per_process=3",
            "--timeout=400",
            "--",
            *CHAT,
            "--tp=3",
            "--pp=2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=500,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, "-m", "jaxinfer", *CHAT, "--tp=3", "--pp=2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(6),
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert (launched.stdout, single.stdout) == ("The capital of France is Paris.\n",) * 2, launched.stderr[-2000:]


def test_a_dead_process_makes_the_other_exit_with_an_error(tiny_dir):
    port = 21000 + os.getpid() % 5000
    cmd = [
        sys.executable,
        "-m",
        "jaxinfer",
        "generate",
        f"--model={tiny_dir('llama3')}",
        "--tp=2",
        "--prompt_ids=3,17,250",
        "--max_tokens=250",
        "--ignore_eos",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, f"--process_id={i}"], cwd=ROOT, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    time.sleep(12)  # both joined and working
    procs[1].kill()
    start = time.monotonic()
    try:
        procs[0].wait(timeout=90)
    finally:
        procs[0].kill()
    assert time.monotonic() - start < 90
    assert procs[0].returncode != 0


def test_launcher_reports_a_failing_process():
    r = subprocess.run(
        [
            sys.executable,
            "launch/local.py",
            "--num_processes=2",
            "--devices_per_process=1",
            "--",
            "generate",
            "--model=/nonexistent",
            "--prompt_ids=1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 1
    assert "launch: process" in r.stderr and "failed; stopped the others" in r.stderr
