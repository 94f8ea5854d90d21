"""Load on `jaxinfer serve` through the official `openai` client: Poisson arrivals, mixed prompt and
output lengths, a fixed seed, bounded in requests and time. For each K in --replicas it starts
`python -m jaxinfer serve --replicas=K` on 127.0.0.1 (or uses --base_url), streams every request, and
prints throughput, time to first token and time per output token (p50/p90/p99) and errors:

    python benchmarks/serve_load.py --replicas=1,2 --num_requests=48 --rate=4 -- --max_num_seqs=8

Arguments after `--` go to `jaxinfer serve`. TTFT is from sending a request to its first streamed
text; TPOT is (last token time - first token time) / (output tokens - 1), output tokens from the
final usage chunk. Before measuring, --warmup_requests requests (another draw of the same mix, all at
once) let each replica compile the step shapes the load meets. The server's log goes to --server_log.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

WORDS = (
    "the of and to in is was for on that with as by at from his her they this are be or an had not "
    "have which one all were we when there can been has more if will their would so no what about up "
    "out time them into only some could new other then these two may first any like now my such make "
    "over our even most after also made many before must through back years where much your way well "
    "down should because each just those people how too little state good very world still own see "
    "men work long here get both between life being under never day same another know while last might"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = ""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip()
        gpu = f", {len(out.splitlines())} x {out.splitlines()[0].split(':', 1)[1].split('(')[0].strip()}" if out else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}"


def workload(n: int, rate: float, seed: int, prompt_words: list[int], max_tokens: list[int], shared: float):
    """(arrival time, prompt, max_tokens) of each request: exponential gaps at `rate` per second, prompt
    and output lengths drawn from the given choices; a fraction `shared` of the prompts start with
    one common 200-word preamble (what the router's prefix affinity is for)."""
    rng = random.Random(seed)
    preamble = " ".join(rng.choice(WORDS) for _ in range(200))
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.choice(prompt_words)))
        prompt = f"{preamble} {words}" if rng.random() < shared else f"Request {i}: {words}"
        out.append((t, prompt, rng.choice(max_tokens)))
    return out


def work_shape(args) -> tuple:
    return (
        [int(x) for x in args.prompt_words.split(",")],
        [int(x) for x in args.max_tokens.split(",")],
        args.shared_prefix,
    )


async def one(client, model: str, prompt: str, max_tokens: int, start: float, at: float, deadline: float) -> dict:
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    sent = time.perf_counter()
    first = last = None
    tokens, error = 0, None
    try:
        async with asyncio.timeout(max(1.0, deadline - sent)):
            stream = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].text:
                    first = first or now
                    last = now
                if chunk.choices and chunk.choices[0].finish_reason not in (None, "stop", "length"):
                    error = f"finish_reason {chunk.choices[0].finish_reason}"
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
    except Exception as e:  # counted, and the load goes on
        error = f"{type(e).__name__}: {e}"[:200]
    end = time.perf_counter()
    first = first or end
    last = last or end
    return dict(
        ttft=first - sent,
        tpot=(last - first) / (tokens - 1) if tokens > 1 else None,
        tokens=tokens,
        end=end,
        error=error,
    )


async def run_load(base_url: str, api_key: str, model: str | None, args) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=args.max_duration_s)
    if model is None:
        model = (await client.models.list()).data[0].id
    work = workload(args.num_requests, args.rate, args.seed, *work_shape(args))
    if args.warmup_requests:  # compiles the step shapes the load will meet; not measured
        t0 = time.perf_counter()
        warm = workload(args.warmup_requests, 1e9, args.seed + 1, *work_shape(args))
        end = t0 + args.max_duration_s
        await asyncio.gather(*(one(client, model, p, m, t0, 0.0, end) for _, p, m in warm))
        print(f"serve_load: warm-up took {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    start = time.perf_counter()
    deadline = start + args.max_duration_s
    results = await asyncio.gather(*(one(client, model, p, m, start, at, deadline) for at, p, m in work))
    await client.close()
    ok = [r for r in results if r["error"] is None]
    wall = max(r["end"] for r in results) - start
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    errors = [r["error"] for r in results if r["error"] is not None]
    return dict(
        requests=len(results),
        wall_s=wall,
        req_per_s=len(ok) / wall,
        tok_per_s=sum(r["tokens"] for r in ok) / wall,
        ttft=[pct(ttft, q) for q in (50, 90, 99)],
        tpot=[pct(tpot, q) for q in (50, 90, 99)],
        errors=len(errors),
        first_error=errors[0] if errors else "",
    )


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve_load: the server exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise SystemExit(f"serve_load: the server was not healthy after {timeout:g}s")


def with_server(k: int, args, serve_args: list[str]) -> dict:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "jaxinfer",
        "serve",
        f"--model={args.model}",
        f"--replicas={k}",
        "--host=127.0.0.1",
        f"--port={port}",
        *serve_args,
    ]
    print(f"serve_load: starting {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    with open(args.server_log, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        wait_healthy(f"http://127.0.0.1:{port}", proc, args.start_timeout_s)
        print(f"serve_load: K={k} healthy after {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
        return asyncio.run(run_load(f"http://127.0.0.1:{port}/v1", "unused", None, args))
    finally:
        proc.send_signal(signal.SIGTERM)  # drains, then exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> None:
    if "--" in argv:
        i = argv.index("--")
        argv, serve_args = argv[:i], argv[i + 1 :]
    else:
        serve_args = []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="1,2", help="comma-separated K values, one server each")
    p.add_argument("--base_url", default=None, help="an OpenAI base URL to load instead of starting servers")
    p.add_argument("--api_key", default=os.environ.get("JAXINFER_API_KEY", "unused"))
    p.add_argument("--model", default="smollm2-135m", help="what the started servers load")
    p.add_argument("--num_requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--prompt_words", default="8,32,128", help="prompt lengths in words to draw from")
    p.add_argument("--max_tokens", default="16,32,64", help="max_tokens values to draw from")
    p.add_argument("--shared_prefix", type=float, default=0.25, help="fraction of prompts sharing a preamble")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup_requests", type=int, default=16, help="sent at once before measuring, unmeasured")
    p.add_argument("--max_duration_s", type=float, default=120.0, help="requests still open then are errors")
    p.add_argument("--start_timeout_s", type=float, default=600.0)
    p.add_argument("--server_log", default="/tmp/serve_load_server.log")
    args = p.parse_args(argv)
    rows = []
    if args.base_url:
        rows.append(("given", asyncio.run(run_load(args.base_url, args.api_key, None, args))))
    else:
        for k in [int(x) for x in args.replicas.split(",")]:
            rows.append((str(k), with_server(k, args, serve_args)))
    print(f"\nmachine: {machine()}")
    print(
        f"model {args.model if not args.base_url else '(given server)'}; {args.num_requests} requests, Poisson "
        f"{args.rate:g}/s, prompts {args.prompt_words} words, max_tokens {args.max_tokens}, "
        f"{args.shared_prefix:.0%} share a preamble, seed {args.seed}; server args: {' '.join(serve_args) or '-'}\n"
    )
    print("| K | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | errors |")
    print("|---|---|---|---|---|---|")
    for k, r in rows:
        ttft = " / ".join(f"{x:.0f}" for x in r["ttft"])
        tpot = " / ".join(f"{x:.1f}" for x in r["tpot"])
        print(
            f"| {k} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | {ttft} | {tpot} | {r['errors']}/{r['requests']} |"
        )
    for k, r in rows:
        if r["first_error"]:
            print(f"K={k}: first error: {r['first_error']}")
    print("(no vLLM or SGLang figures: neither was measured on this machine)")


if __name__ == "__main__":
    main(sys.argv[1:])
