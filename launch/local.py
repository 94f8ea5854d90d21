"""Runs the jaxinfer CLI as N cooperating processes on this machine, each with M simulated CPU devices,
forming one mesh of N x M devices over gloo collectives:

    python launch/local.py --num_processes=2 --devices_per_process=3 -- generate --tp=3 --pp=2 --chat \\
        --prompt="What is the capital of France?"

Prints what process 0 prints; exits non-zero (and stops the others) as soon as any process fails.
"""

from __future__ import annotations

import argparse
import os
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
        )
        for i in range(args.num_processes)
    ]
    out: list[bytes] = []
    threading.Thread(target=lambda: out.append(procs[0].stdout.read()), daemon=True).start()
    deadline = time.monotonic() + args.timeout
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        if time.monotonic() > deadline:
            failed = -1
        time.sleep(0.2)
    failed = failed if failed is not None else next((i for i, p in enumerate(procs) if p.returncode), None)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        p.wait()
    time.sleep(0.2)  # let the reader take process 0's last bytes
    sys.stdout.write(b"".join(out).decode(errors="replace"))
    sys.stdout.flush()
    if failed is None:
        return 0
    if failed >= 0 and failed > 0 and procs[failed].stderr is not None:
        sys.stderr.write(procs[failed].stderr.read().decode(errors="replace")[-4000:])
    sys.stderr.write(f"launch: {'timed out' if failed < 0 else f'process {failed} failed'}; stopped the others\n")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
