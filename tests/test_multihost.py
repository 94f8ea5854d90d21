"""Several real processes forming one mesh over gloo, as launch/local.py starts them."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_a_launcher_the_survivor_stops_within_the_heartbeat_timeout(tiny_dir):
    """No launcher watches these two: process 0 notices its dead peer through jax.distributed's
    heartbeats (distributed.HEARTBEAT_TIMEOUT_S) and aborts with jax's message instead of hanging."""
    from jaxinfer import distributed

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
        f"--coordinator_address=127.0.0.1:{_free_port()}",
        "--num_processes=2",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, f"--process_id={i}"], cwd=ROOT, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    lines: list[bytes] = []
    joined = threading.Event()

    def read():
        for line in procs[0].stderr:
            lines.append(line)
            if b"process 0 of 2;" in line:
                joined.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert joined.wait(300), b"".join(lines[-50:]).decode(errors="replace")
        procs[1].kill()
        start = time.monotonic()
        procs[0].wait(timeout=distributed.HEARTBEAT_TIMEOUT_S + 60)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
    reader.join(timeout=10)
    err = b"".join(lines).decode(errors="replace")
    assert elapsed < distributed.HEARTBEAT_TIMEOUT_S + 30
    assert procs[0].returncode == -signal.SIGABRT, err[-3000:]
    assert (
        "Terminating process because the JAX distributed service detected fatal errors. "
        "This most likely indicates that another task died" in err
    ), err[-3000:]


def test_a_dead_process_stops_the_run_with_one_line_naming_it(tiny_dir):
    """Process 1 is killed mid-run: the launcher stops process 0 and says which process died, how."""
    launcher = subprocess.Popen(
        [
            sys.executable,
            "launch/local.py",
            "--num_processes=2",
            "--devices_per_process=1",
            "--timeout=400",
            "--",
            "generate",
            f"--model={tiny_dir('llama3')}",
            "--tp=2",
            "--prompt_ids=3,17,250",
            "--max_tokens=250",
            "--ignore_eos",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    joined = threading.Event()

    def read():
        for line in launcher.stderr:
            lines.append(line.rstrip("\n"))
            if "process 0 of 2;" in line:  # jax.distributed joined every process
                joined.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert joined.wait(300), "\n".join(lines[-50:])
        pids = [re.fullmatch(r"launch: started process (\d) of 2 \(pid (\d+)\)", x) for x in lines]
        pid = {int(m.group(1)): int(m.group(2)) for m in pids if m}[1]
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        launcher.wait(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        launcher.kill()
    reader.join(timeout=10)
    assert launcher.returncode == 1, "\n".join(lines[-50:])
    assert elapsed < 60
    assert lines[-1] == f"launch: process 1 (pid {pid}) was killed by SIGKILL (exit code -9); stopped the others"


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
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"launch: process [01] \(pid \d+\) exited with code 1; stopped the others", last), last
    assert "error: model '/nonexistent' is not a built-in name" in r.stderr
