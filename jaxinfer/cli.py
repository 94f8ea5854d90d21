"""`jaxinfer generate | convert`: completions on stdout, logs on stderr."""

from __future__ import annotations

import logging
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "HF checkpoint directory, .gguf file, orbax checkpoint or built-in name.")
flags.DEFINE_integer("tp", 1, "Tensor-parallel degree (mesh axis tp).")
flags.DEFINE_integer("pp", 1, "Pipeline-parallel degree (mesh axis pp).")
flags.DEFINE_integer(
    "pp_microbatch_rows",
    None,
    "pp > 1: the fewest rows (tokens) a step's batch is cut into micro-batches of, at most pp of them "
    "(default 256: a decode batch below it runs as one micro-batch, reading each stage's weights once).",
)
flags.DEFINE_integer("ep", 1, "Expert-parallel degree (mesh axis ep).")
flags.DEFINE_integer("sp", 1, "Sequence-parallel degree (mesh axis sp).")
flags.DEFINE_integer("dp", 1, "Data-parallel degree (mesh axis dp: independent batch shards).")
flags.DEFINE_string("mesh", None, "Mesh preset name (meshes/*.json) or JSON file, instead of the axis flags.")
flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "Weights and activations (default: float32 on CPU, bfloat16 on GPU)."
)
flags.DEFINE_enum(
    "quant",
    "auto",
    ["auto", "none", "int8", "fp8", "int4"],
    "Weights: auto (a checkpoint stored quantized stays so: HF fp8, compressed-tensors, GGUF Q8_0/Q4_0; others "
    "at --dtype), none (all at --dtype), int8 / fp8 (per output channel), int4 (groups of 128 inputs, two per "
    "byte): the attention, MLP and expert projections.",
)
flags.DEFINE_enum(
    "kv_cache_dtype",
    "auto",
    ["auto", "fp8", "int8"],
    "KV-cache storage: auto (the activation dtype), int8 or fp8 (a float32 scale per token and kv head).",
)
flags.DEFINE_bool(
    "quantize_head", False, "With --quant: the output head (and a tied embedding) quantized with the same scheme."
)
flags.DEFINE_integer("max_seq_len", None, "Context limit (default: the model's max_position_embeddings).")
flags.DEFINE_integer("max_num_seqs", None, "Engine: sequences decoded together (default 16).")
flags.DEFINE_integer(
    "num_pages", None, "Engine: KV-cache pages (default: what max_num_seqs x max_seq_len needs, capped by memory)."
)
flags.DEFINE_integer("page_size", None, "Engine: tokens per KV-cache page (default 16).")
flags.DEFINE_integer("prefill_chunk", None, "Engine: prompt tokens per prefill step (default 128).")
flags.DEFINE_string(
    "compilation_cache", None, "jax's persistent compilation cache directory (default ~/.cache/jaxinfer/xla; '' off)."
)
flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for a batch.")
flags.DEFINE_string("prompt_ids", None, "A prompt as comma-separated token ids (for checkpoints without tokenizer).")
flags.DEFINE_bool("chat", False, "Apply the model's chat template to each prompt.")
flags.DEFINE_integer("max_tokens", 64, "Maximum new tokens per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this probability mass (1: all).")
flags.DEFINE_integer("seed", None, "Random seed for sampling (reproducible when set).")
flags.DEFINE_multi_string("stop", None, "Stop string; repeat for several.")
flags.DEFINE_bool("ignore_eos", False, "Keep generating past the end-of-sequence token.")
flags.DEFINE_string("output", None, "convert: directory to write the orbax checkpoint to.")
flags.DEFINE_bool("random_weights", False, "Random weights created on the devices (any model or built-in shape).")
flags.DEFINE_enum(
    "moe_dispatch", "auto", ["auto", "all_to_all", "psum"], "MoE: how tokens reach their experts (see README)."
)
flags.DEFINE_enum(
    "attention",
    "auto",
    ["auto", "pallas", "interpret", "xla"],
    "Engine decode attention: auto (the Pallas kernel on GPU when it compiles, else XLA; logged), pallas, "
    "interpret (Pallas interpret mode, CPU tests) or xla.",
)
flags.DEFINE_enum(
    "moe_kernel", "auto", ["auto", "pallas", "interpret", "xla"], "MoE: the grouped expert matmul implementation."
)
flags.DEFINE_enum(
    "fp8_kernel",
    "auto",
    ["auto", "pallas", "interpret", "xla"],
    "fp8 weights at decode rows on one GPU: pallas (pallas_kernels/fp8_matmul), interpret, xla, or auto "
    "(XLA's cast-and-dot until the kernel is measured faster; logged).",
)
flags.DEFINE_integer("batch", 1, "explain: batch size of the steps to compile.")
flags.DEFINE_integer("prompt_len", 128, "explain/bench: prompt length in tokens.")
flags.DEFINE_integer("gen_len", 128, "explain/bench: new tokens per sequence (sizes the KV cache).")
flags.DEFINE_list("batch_sizes", ["1", "16", "64"], "bench: batch sizes to measure.")
flags.DEFINE_list(
    "prompt_lens",
    None,
    "bench: the sequence-parallel prefill sweep instead of the decode rows: prefill time and memory per "
    "device at these prompt lengths for sp = 1, 2, 4, ... up to --sp.",
)
flags.DEFINE_bool("json", False, "explain/bench: print one JSON object instead of a table.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes form the mesh.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index (0 prints the results).")
flags.DEFINE_integer(
    "replicas",
    1,
    "serve: independent engines, each on its own tp*pp*ep*sp*dp devices (a multi-process run is one replica "
    "spanning every process: 1).",
)
flags.DEFINE_string("host", "127.0.0.1", "serve: address to bind (0.0.0.0 opens the server to the network).")
flags.DEFINE_integer("port", 8000, "serve: TCP port.")
flags.DEFINE_string(
    "api_key", None, "serve: the key every route but /health needs as 'Bearer KEY' (default $JAXINFER_API_KEY)."
)
flags.DEFINE_integer("max_queue", None, "serve: requests that may wait beyond those running; past it 429.")
flags.DEFINE_string("served_model_name", None, "serve: the model name clients send (default: --model).")
flags.DEFINE_float("drain_timeout_s", 30.0, "serve: on SIGTERM/SIGINT, how long running requests get to finish.")
flags.DEFINE_integer("max_body_bytes", 4 * 2**20, "serve: largest request body accepted; larger get 413.")
flags.DEFINE_string("gpu", "h100-sxm", "plan: a GPU kind of jaxinfer/hardware.toml (or --hardware): h100-sxm, cpu...")
flags.DEFINE_integer("gpus_per_node", 8, "plan: GPUs in each node.")
flags.DEFINE_integer("nodes", 1, "plan: nodes in the cluster.")
flags.DEFINE_integer("isl", 2048, "plan: input (prompt) tokens per request.")
flags.DEFINE_integer("osl", 256, "plan: output tokens per request.")
flags.DEFINE_float("tpot_ms", 50.0, "plan: time-per-output-token target in milliseconds.")
flags.DEFINE_float("ttft_ms", None, "plan: time-to-first-token target in milliseconds (optional).")
flags.DEFINE_string("calibrate", None, "plan: a `jaxinfer bench --json` report (fitted) or a calibration file.")
flags.DEFINE_string("hardware", None, "plan: a TOML file of GPU kinds laid out like jaxinfer/hardware.toml.")
flags.DEFINE_float("gpu_memory_utilization", 0.9, "plan: share of each GPU's memory weights, activations and KV take.")

USAGE = """usage: jaxinfer <command> [--flags]

commands:
  generate   load --model onto the mesh and print the completion of each --prompt
  convert    load --model and write it to --output as an orbax checkpoint (loads back onto any mesh)
  explain    compile prefill and decode on the mesh without weights: memory and collectives per device
  bench      measure TTFT, TPOT, tokens/s and memory-bandwidth utilisation for --batch_sizes
  serve      an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions) over --replicas
  plan       choose tp x pp x ep x sp x replicas x quant for --model on --nodes x --gpus_per_node --gpu at a --tpot_ms

Logs go to stderr, completions to stdout. Example:
  jaxinfer generate --tp=3 --chat --prompt="What is the capital of France?"
"""


def _axes() -> dict[str, int]:
    return dict(tp=FLAGS.tp, pp=FLAGS.pp, ep=FLAGS.ep, sp=FLAGS.sp, dp=FLAGS.dp)


def _int_list(flag: str, text: str, minimum: int, what: str, example: str) -> list[int]:
    """The comma-separated integers of a flag's value; a JaxinferError naming the bad piece otherwise."""
    from jaxinfer.errors import JaxinferError

    values = []
    for piece in text.split(","):
        try:
            value = int(piece.strip())
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise JaxinferError(
                f"--{flag}={text}: {piece.strip()!r} is not {what}; give comma-separated integers >= {minimum}, "
                f"e.g. --{flag}={example}"
            )
        values.append(value)
    return values


def _at_least_one(*names: str) -> None:
    from jaxinfer.errors import JaxinferError

    for name in names:
        value = getattr(FLAGS, name)
        if value < 1:
            raise JaxinferError(f"--{name}={value} must be an integer >= 1")


def _llm_kwargs(max_num_seqs: int | None = None) -> dict:
    """LLM(...)'s arguments from the shared flags (a replica worker builds its own LLM from them)."""
    return dict(
        model=FLAGS.model,
        **_axes(),
        mesh=FLAGS.mesh,
        dtype=FLAGS.dtype,
        max_seq_len=FLAGS.max_seq_len,
        random_weights=FLAGS.random_weights,
        moe_dispatch=FLAGS.moe_dispatch,
        moe_kernel=FLAGS.moe_kernel,
        attention=FLAGS.attention,
        max_num_seqs=FLAGS.max_num_seqs or max_num_seqs,
        num_pages=FLAGS.num_pages,
        page_size=FLAGS.page_size,
        prefill_chunk=FLAGS.prefill_chunk,
        compilation_cache=FLAGS.compilation_cache,
        quant=FLAGS.quant,
        kv_cache_dtype=FLAGS.kv_cache_dtype,
        quantize_head=FLAGS.quantize_head,
        fp8_kernel=FLAGS.fp8_kernel,
        pp_microbatch_rows=FLAGS.pp_microbatch_rows,
    )


def _llm(max_num_seqs: int | None = None):
    from jaxinfer.llm import LLM

    return LLM(**_llm_kwargs(max_num_seqs))


def cmd_generate() -> None:
    import jax

    from jaxinfer.errors import JaxinferError
    from jaxinfer.sampling import SamplingParams

    if FLAGS.prompt_ids:
        prompts = [_int_list("prompt_ids", FLAGS.prompt_ids, 0, "a token id", "1,2,3")]
    elif FLAGS.prompt:
        prompts = FLAGS.prompt
    else:
        raise JaxinferError("give --prompt=TEXT (repeatable) or --prompt_ids=1,2,3")
    params = SamplingParams(
        max_tokens=FLAGS.max_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        seed=FLAGS.seed,  # unseeded requests draw process 0's seed in the engine
        stop=FLAGS.stop,
        ignore_eos=FLAGS.ignore_eos,
    )
    # One run of known prompts: a KV pool for them, not for 16 full-length sequences (--max_num_seqs).
    llm = _llm(max_num_seqs=len(prompts))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, chat=FLAGS.chat)
    dt = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    logging.info("generated %d tokens in %.2fs (%.1f tok/s, compile included)", n, dt, n / dt)
    if jax.process_index() == 0:
        for o in outs:
            print(o.text if llm.tokenizer else " ".join(map(str, o.token_ids)), flush=True)


def cmd_convert() -> None:
    from jaxinfer import checkpoint
    from jaxinfer.errors import JaxinferError

    if not FLAGS.output:
        raise JaxinferError("convert needs --output=DIRECTORY")
    llm = _llm()
    from pathlib import Path

    # --quant=auto keeps a quantized checkpoint's weights as stored; int8/fp8/int4 write that format.
    checkpoint.save_orbax(Path(FLAGS.output), llm.config, llm.params, llm.tokenizer, llm.setup.quant)
    logging.info("wrote orbax checkpoint (%s weights) to %s", llm.setup.quant, FLAGS.output)
    print(FLAGS.output)


def cmd_explain() -> None:
    import json

    from jaxinfer import explain, runtime

    _at_least_one("batch", "prompt_len", "gen_len")
    n = 1
    for v in _axes().values():
        n *= v
    runtime.ensure_devices(n)
    report = explain.explain(
        FLAGS.model,
        _axes(),
        FLAGS.mesh,
        FLAGS.dtype,
        FLAGS.batch,
        FLAGS.prompt_len,
        FLAGS.gen_len,
        moe_dispatch=FLAGS.moe_dispatch,
        attention=FLAGS.attention,
        moe_kernel=FLAGS.moe_kernel,
        quant=FLAGS.quant,
        kv_cache_dtype=FLAGS.kv_cache_dtype,
        quantize_head=FLAGS.quantize_head,
    )
    print(json.dumps(report) if FLAGS.json else explain.format_report(report))


def cmd_bench() -> None:
    import json

    from jaxinfer import bench
    from jaxinfer.llm import LLM

    _at_least_one("prompt_len", "gen_len")
    if FLAGS.prompt_lens:
        lens = _int_list("prompt_lens", ",".join(FLAGS.prompt_lens), 1, "a prompt length", "1024,2048,4096")
        sps = [s for s in (1, 2, 4, 8, 16, 32, 64) if s < FLAGS.sp and FLAGS.sp % s == 0] + [FLAGS.sp]
        kwargs = _llm_kwargs(1)
        report = bench.prefill_sweep(lambda sp: LLM(**{**kwargs, "sp": sp}), sps, lens)
        print(json.dumps(report) if FLAGS.json else bench.format_prefill_sweep(report))
        return
    sizes = _int_list("batch_sizes", ",".join(FLAGS.batch_sizes), 1, "a batch size", "1,16,64")
    report = bench.run(_llm(), sizes, FLAGS.prompt_len, FLAGS.gen_len)
    print(json.dumps(report) if FLAGS.json else bench.format_table(report))


def cmd_serve() -> None:
    from jaxinfer import distributed
    from jaxinfer.errors import JaxinferError

    _at_least_one("replicas", "max_body_bytes")
    if FLAGS.max_queue is not None and FLAGS.max_queue < 0:
        raise JaxinferError(f"--max_queue={FLAGS.max_queue} must be >= 0 (or left out: no bound)")
    if not 0 < FLAGS.port < 65536:
        raise JaxinferError(f"--port={FLAGS.port} must be in [1, 65535]")
    name = FLAGS.served_model_name or FLAGS.model
    if distributed.joined():
        _serve_across_processes(name)
        return
    if FLAGS.replicas == 1:
        from jaxinfer.serving.backend import InProcessBackend

        backend = InProcessBackend(_llm(), model_name=name, max_queue=FLAGS.max_queue)
    else:
        from jaxinfer.serving.replicas import ReplicaPool

        backend = ReplicaPool(_llm_kwargs(), FLAGS.replicas, max_queue=FLAGS.max_queue)
        backend.model_name = name
    _serve(backend, name)


def _serve(backend, name: str) -> None:
    from jaxinfer.serving import app as serving

    serving.serve(
        backend,
        host=FLAGS.host,
        port=FLAGS.port,
        api_key=FLAGS.api_key,
        served_model_name=name,
        max_body_bytes=FLAGS.max_body_bytes,
        drain_timeout_s=FLAGS.drain_timeout_s,
    )


def _serve_across_processes(name: str) -> None:
    """One replica over every process of a multi-process run (pp across hosts): process 0 serves HTTP and
    leads the engine, publishing each step's changes; the others follow it until it stops them."""
    import signal

    import jax

    from jaxinfer.errors import JaxinferError
    from jaxinfer.serving.backend import InProcessBackend
    from jaxinfer.serving.replicas import mesh_size

    me, processes = jax.process_index(), jax.process_count()
    if FLAGS.replicas != 1:
        raise JaxinferError(
            f"--replicas={FLAGS.replicas}: in a multi-process run the one replica spans every process; give "
            "--replicas=1 (one launch per replica, each behind its own port)"
        )
    kwargs = _llm_kwargs()
    if mesh_size(kwargs) != jax.device_count():
        raise JaxinferError(
            f"the mesh needs {mesh_size(kwargs)} devices but the {processes} processes hold {jax.device_count()}; "
            "a replica spanning processes uses every device of the run: make the mesh axes multiply to "
            f"{jax.device_count()} (e.g. --pp={processes} with --tp={jax.local_device_count()})"
        )
    if me != 0:
        # SIGTERM/SIGINT are process 0's to handle: it drains, then stops us (a launcher or a terminal
        # may signal every process at once)
        def note(sig, frame):
            logging.info("signal %d: process %d stops when process 0 has drained", sig, me)

        signal.signal(signal.SIGTERM, note)
        signal.signal(signal.SIGINT, note)
    llm = _llm()
    engine = llm.engine
    if me != 0:
        logging.info("process %d of %d follows process 0's engine steps", me, processes)
        engine.follow()
        logging.info("process 0 stopped the replica; process %d exits", me)
        return
    engine.lead()
    try:
        _serve(InProcessBackend(llm, model_name=name, max_queue=FLAGS.max_queue), name)
    finally:
        engine.stop_followers()


def cmd_plan() -> None:
    from jaxinfer import plan

    request = plan.Request(
        model=FLAGS.model,
        gpu=FLAGS.gpu,
        gpus_per_node=FLAGS.gpus_per_node,
        nodes=FLAGS.nodes,
        isl=FLAGS.isl,
        osl=FLAGS.osl,
        tpot_ms=FLAGS.tpot_ms,
        ttft_ms=FLAGS.ttft_ms,
        quant=FLAGS.quant,
        hardware=FLAGS.hardware,
        gpu_memory_utilization=FLAGS.gpu_memory_utilization,
        calibrate=FLAGS.calibrate,
    )
    result = plan.plan(request)
    print(plan.to_json(result) if FLAGS.json else plan.format_plan(result))


COMMANDS = {
    "generate": cmd_generate,
    "convert": cmd_convert,
    "explain": cmd_explain,
    "bench": cmd_bench,
    "serve": cmd_serve,
    "plan": cmd_plan,
}


def _keep_stdout_for_results() -> None:
    """Completions alone on stdout: native code that prints there (gloo writes connection notes to
    it from several threads at once) is pointed at stderr, Python's stdout at a copy of the original."""
    sys.stdout.flush()
    results = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(results, "w", buffering=1)


def main(argv: list[str]) -> int:
    from jaxinfer import distributed
    from jaxinfer.errors import JaxinferError

    if len(argv) != 2 or argv[1] not in COMMANDS:
        sys.stderr.write(USAGE)
        return 2
    _keep_stdout_for_results()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        COMMANDS[argv[1]]()
    except JaxinferError as e:
        # One line, no traceback: the message names the value and the fix.
        sys.stderr.write("error: " + " ".join(str(e).split("\n")) + "\n")
        return 1
    return 0


def run() -> None:
    if len(sys.argv) == 1 or any(a in ("-h", "--help", "-help", "--helpshort") for a in sys.argv[1:]):
        # absl's own --help lists only the flags of the __main__ module, which is not this one.
        sys.stdout.write(USAGE + "\nflags:\n" + FLAGS.module_help(__name__) + "\n")
        sys.exit(0)
    app.run(main)


if __name__ == "__main__":
    run()
