"""Runs the jaxinfer CLI as N cooperating processes on this machine, each with M simulated CPU devices,
forming one mesh of N x M devices over gloo collectives:

    python launch/local.py --num_processes=2 --devices_per_process=3 -- generate --tp=3 --pp=2 --chat \\
        --prompt="What is the capital of France?"

Prints what process 0 prints. As soon as any process fails, stops the others, prints one line naming
it (`launch: process 1 (pid 4242) was killed by SIGKILL (exit code -9); stopped the others`) and exits 1.

SIGTERM or SIGINT (Ctrl-C) goes to process 0 alone (the processes run in sessions of their own, so a
terminal's Ctrl-C reaches only this launcher): `jaxinfer serve` drains there and then stops the other
processes, and all exit 0. A second signal kills every process at once.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before every process is stopped")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the jaxinfer CLI arguments")
    args = parser.parse_args(argv)
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    if args.num_processes < 1 or args.devices_per_process < 1 or not cli:
        parser.error("need --num_processes >= 1, --devices_per_process >= 1 and CLI arguments after --")
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process}",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxinfer",
                *cli,
                f"--coordinator_address={address}",
                f"--num_processes={args.num_processes}",
                f"--process_id={i}",
            ],
            env=env,
            stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
            stderr=None if i == 0 else subprocess.PIPE,
            start_new_session=True,
        )
        for i in range(args.num_processes)
    ]
    for i, p in enumerate(procs):
        sys.stderr.write(f"launch: started process {i} of {args.num_processes} (pid {p.pid})\n")
    sys.stderr.flush()
    signals: list[int] = []

    def forward(sig, frame):
        signals.append(sig)
        for p in procs:
            if p.poll() is not None:
                continue
            if len(signals) > 1:
                p.kill()
            elif p is procs[0]:
                p.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    out: list[bytes] = []
    readers = [threading.Thread(target=lambda: out.append(procs[0].stdout.read()), daemon=True)]
    # The other processes' logs are kept (the last 64 KiB of each) to show if one fails; reading them
    # as they come keeps a chatty process from blocking on a full pipe.
    tails = [collections.deque(maxlen=64) for _ in procs]
    for p, tail in zip(procs[1:], tails[1:]):
        readers.append(threading.Thread(target=_drain, args=(p.stderr, tail), daemon=True))
    for r in readers:
        r.start()
    deadline = time.monotonic() + args.timeout
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        if failed is None and time.monotonic() > deadline:
            failed = -1
        time.sleep(0.2)
    failed = failed if failed is not None else next((i for i, p in enumerate(procs) if p.returncode), None)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for r in readers:
        r.join(timeout=5)  # process 0's last bytes, the others' last log lines
    sys.stdout.write(b"".join(out).decode(errors="replace"))
    sys.stdout.flush()
    if failed is None:
        return 0
    if failed > 0:
        sys.stderr.write(b"".join(tails[failed]).decode(errors="replace")[-4000:])
    sys.stderr.write(_failure(failed, procs, args.timeout) + "\n")
    return 1


def _drain(stream, tail: collections.deque) -> None:
    for chunk in iter(lambda: stream.read1(1024), b""):
        tail.append(chunk)


def _failure(failed: int, procs: list[subprocess.Popen], timeout: float) -> str:
    """One line: which process ended the run (index, pid) and how, or that the run timed out."""
    if failed < 0:
        return f"launch: timed out after {timeout:g}s; stopped the others"
    p = procs[failed]
    if p.returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-p.returncode).name}"
        except ValueError:
            how = f"was killed by signal {-p.returncode}"
        how += f" (exit code {p.returncode})"
    else:
        how = f"exited with code {p.returncode}"
    return f"launch: process {failed} (pid {p.pid}) {how}; stopped the others"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
