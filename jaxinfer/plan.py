"""`plan`: the tp x pp x ep x sp x replicas x quantization to serve a model with on a cluster, for a
latency target.

Memory comes from explain's figures: the parameters and the KV cache as the rules table shards them
over the mesh (abstract arrays, nothing made), and the activation peak from the compiled prefill and
decode programs. Time comes from a roofline per device, max(bytes / bandwidth, flops / peak), plus every
collective of the compiled programs over the link it crosses (tp, ep and sp inside a node, pp between
nodes once a replica spans several), plus the pipeline bubble and a fixed per-step overhead. What fraction
of the peaks a step reaches, and that overhead, come from a calibration file fitted to `bench` results.

Sequence parallelism is planned as the serving engine runs it: the page pool split over sp (each rank
holds the weights whole and 1/sp of the KV), a prompt's first prefill chunk as ring attention (1/sp of
its tokens per rank against all its keys, the ring's permutes on the link), a later chunk with 1/sp of
its tokens per rank outside attention (per layer its queries, keys and values all-gathered over sp, every
query attending to the rank's own pages, 1/sp of the keys, and one all-to-all returning each rank its
tokens' partials), and decode on every rank over its own pages with one all-gather per layer merging the
partials. So sp shortens the TTFT of a long prompt (every chunk's matmuls and attention split over sp)
and lets a context fit, at the price of weights read whole on every sp rank at every step: it is
searched inside a node beside tp and ep, at every pp (the pipeline's stages run the ring and the split
pool inside them; pp may cross nodes), when the prompt spans several prefill chunks, and wins where a
TTFT needs more than tp alone gives.

Compiles are bounded: memory is read per (tp, ep, sp, quant) from the shardings at pp = 1 (a stacked
layer weight and the cache split exactly 1/pp over pp; embedding and head sit on every stage: no
compile), collectives per (tp, ep) from the static path's programs compiled at pp = 1, and the stage
hand-overs from one program compiled at pp = 2 (their count per step follows the pipeline's schedule,
M + pp - 2); with sp > 1, per (tp, ep, sp) from the engine's programs over the split pool
(explain.compile_engine_steps) at pp = 1, and the stage hand-overs per sp from the engine's programs
compiled at tp = ep = 1, pp = 2 (a prefill chunk hands over its activations split over sp). Collectives are
read from the unquantized program at the activation dtype, which is what every weight format moves. So a
plan compiles (number of valid (tp, ep)) + (number of valid (tp, ep, sp > 1)) + 1 + (number of sp > 1
searched with pp > 1) programs, each a prefill and a decode step (three for sp: the ring chunk, a later
chunk, decode).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
import tomllib
from pathlib import Path

import numpy as np

from jaxinfer import config as config_lib
from jaxinfer import explain, hlo, pipeline
from jaxinfer.errors import JaxinferError
from jaxinfer.hlo import group_axes
from models import quant as quant_lib

log = logging.getLogger(__name__)
HARDWARE = Path(__file__).with_name("hardware.toml")
CALIBRATION_DIR = Path(__file__).with_name("calibration")
QUANTS = ("none", "fp8", "int8", "int4")
AUTO_QUANTS = ("none", "fp8", "int8")  # int4 re-rounds weights with a large quality cost (README): asked for only
PRECISION = {"none": 0, "int8": 1, "fp8": 2, "int4": 3}  # the last tie-break: the more precise weights
PREFILL_CHUNK = 2048  # prompt tokens per prefill step when planning (the engine's --prefill_chunk)
CONFIG_KEYS = (
    "tp",
    "pp",
    "ep",
    "sp",
    "replicas",
    "quant",
    "gpus_per_replica",
    "nodes_per_replica",
    "weight_bytes_per_gpu",
    "kv_bytes_per_gpu",
    "max_concurrent_seqs",
    "ttft_ms",
    "tpot_ms",
    "tokens_per_s_per_gpu",
    "meets_targets",
)
_NUMBERS = (
    "memory_gb",
    "hbm_gb_s",
    "bf16_tflops",
    "fp8_tflops",
    "int8_tops",
    "intra_node_gb_s",
    "intra_node_latency_us",
    "inter_node_gb_s",
    "inter_node_latency_us",
)


# --- hardware and calibration ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hardware:
    kind: str
    name: str
    memory: float  # bytes per GPU
    bandwidth: float  # bytes/s per GPU
    bf16_flops: float
    fp8_flops: float  # 0: none
    intra_bw: float
    intra_latency: float
    inter_bw: float
    inter_latency: float
    shared: bool  # simulated CPU devices: the node's bandwidth and cores are shared by its devices
    cores: int  # shared: the cores they run on (0: not applicable)
    calibration: str
    sources: dict

    def flops(self, quant: str) -> float:
        """Peak for a step's matmuls: fp8 weights meet fp8 activations natively where the card has fp8;
        int8 and int4 weights are dequantized inside the contraction and compute at the activation dtype."""
        return self.fp8_flops if quant == "fp8" and self.fp8_flops > 0 else self.bf16_flops


def known_hardware(path: str | Path | None = None) -> dict:
    path = Path(path) if path else HARDWARE
    if not path.is_file():
        raise JaxinferError(f"--hardware={path}: no such file; pass a TOML file laid out like {HARDWARE}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise JaxinferError(f"--hardware={path} is not valid TOML ({e}); lay it out like {HARDWARE}") from e


def load_hardware(
    gpu: str, path: str | Path | None = None, num_devices: int = 1, pinned: dict | None = None
) -> Hardware:
    """The GPU kind `gpu` from the hardware file (the built-in one by default). `cpu` measures this
    machine's peaks now, unless `pinned` gives them (a calibration's fractions are fractions of the
    peaks measured with it); its memory is the host's, divided among `num_devices` simulated devices."""
    table = known_hardware(path)
    if gpu not in table:
        raise JaxinferError(
            f"--gpu={gpu!r} is not in {path or HARDWARE}; known: {', '.join(sorted(table))} "
            "(or describe your card in a file passed as --hardware=FILE)"
        )
    entry = dict(table[gpu])
    where = f"{path or HARDWARE} [{gpu}]"
    measured = {k for k in _NUMBERS if entry.get(k) == "measured"}
    for key, value in (pinned or {}).items():
        if key in measured and value:
            entry[key] = value
            measured.discard(key)
    if measured:
        entry.update(_measure_cpu(measured, num_devices))
    for key in _NUMBERS:
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise JaxinferError(f'{where}: {key}={value!r} must be a number >= 0 (or "measured" for cpu)')
    for key in ("memory_gb", "hbm_gb_s", "bf16_tflops", "intra_node_gb_s", "inter_node_gb_s"):
        if entry[key] <= 0:
            raise JaxinferError(f"{where}: {key}={entry[key]!r} must be positive")
    return Hardware(
        kind=gpu,
        name=str(entry.get("name", gpu)),
        memory=entry["memory_gb"] * 1e9,
        bandwidth=entry["hbm_gb_s"] * 1e9,
        bf16_flops=entry["bf16_tflops"] * 1e12,
        fp8_flops=entry["fp8_tflops"] * 1e12,
        intra_bw=entry["intra_node_gb_s"] * 1e9,
        intra_latency=entry["intra_node_latency_us"] * 1e-6,
        inter_bw=entry["inter_node_gb_s"] * 1e9,
        inter_latency=entry["inter_node_latency_us"] * 1e-6,
        shared=bool(entry.get("shared_by_devices", False)),
        cores=(os.cpu_count() or 1) if entry.get("cores") == "measured" else int(entry.get("cores", 0)),
        calibration=str(entry.get("calibration", "gpu.json")),
        sources=dict(entry.get("source", {})),
    )


def peak_flops(device, n: int = 2048, reps: int = 3) -> float:
    """float32 FLOP/s of a large matmul on `device`, best of `reps`."""
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _measure_cpu(keys: set[str], num_devices: int) -> dict:
    import jax

    from jaxinfer import bench

    device = jax.devices()[0]
    out = {}
    if keys & {"hbm_gb_s", "intra_node_gb_s", "inter_node_gb_s"}:
        bw = bench.peak_bandwidth(device) / 1e9
        out.update({k: bw for k in ("hbm_gb_s", "intra_node_gb_s", "inter_node_gb_s") if k in keys})
    if "bf16_tflops" in keys:
        out["bf16_tflops"] = peak_flops(device) / 1e12
    if "memory_gb" in keys:
        out["memory_gb"] = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9 / max(1, num_devices)
    return out


@dataclasses.dataclass(frozen=True)
class Calibration:
    bandwidth_fraction: float = 1.0  # of the peak bandwidth a step's reads reach
    flops_fraction: float = 1.0  # of the peak FLOP/s its matmuls reach
    step_overhead_s: float = 0.0  # fixed cost per compiled step (launches, host round trip)
    collective_latency_s: float | None = None  # overrides the hardware's link latencies when set
    # Layers run in lax.scan (LLM(unroll_layers=False); by default they are unrolled, pipeline stages
    # too), where XLA copies each layer's weights out of the stacked array before using them: the weights
    # cross memory this many times instead of once. Only a bench of scanned layers is priced with it.
    scan_weight_passes: float = 1.0
    # Per weight format, the same for a quantized weight on the weight-only path (its values cast inside
    # the dot: int8 and int4 always, fp8 below quant.FP8_NATIVE_MIN_ROWS rows): on an H200 XLA's fused
    # cast-and-dot read fp8 at about half the rate cuBLAS reads bf16, so its bytes count that many times
    # (in place of the one read of the matmul; a scanned stage's copy adds its own passes at full speed).
    weight_only_passes: tuple[tuple[str, float], ...] = ()
    # On CPU, the peaks the fractions were fitted against (GB/s, TFLOP/s): a shared machine's measured
    # peak moves with its load, and a fraction means something only against the peak it was fitted to.
    peak_gb_s: float | None = None
    peak_tflops: float | None = None
    source: str = "none"  # the file
    measured: str = ""  # how and where it was measured

    def weight_passes(self, fmt: str, rows: float) -> float:
        """How many times a step over `rows` activation rows reads its `fmt` weights' stored bytes."""
        if fmt == "fp8" and quant_lib.native_fp8(rows, gpu=True):
            return 1.0  # the native fp8 GEMM
        return dict(self.weight_only_passes).get(fmt, 1.0)

    def pins(self) -> dict:
        bw, fl = self.peak_gb_s, self.peak_tflops
        return {"hbm_gb_s": bw, "intra_node_gb_s": bw, "inter_node_gb_s": bw, "bf16_tflops": fl}


def load_calibration(path: str | Path) -> Calibration:
    """A calibration file (jaxinfer/calibration/*.json), by path or by name in that directory."""
    p = Path(path)
    if not p.is_file():
        p = CALIBRATION_DIR / str(path)
    if not p.is_file():
        raise JaxinferError(
            f"calibration {path!r}: no such file; pass a file written by `jaxinfer bench --json` or one of "
            f"{', '.join(sorted(x.name for x in CALIBRATION_DIR.glob('*.json')))}"
        )
    obj = config_lib.read_json_object(p, "pass a file written by `jaxinfer bench --json` or a calibration file")
    if "rows" in obj:
        raise JaxinferError(f"{p} is a bench report; pass it as --calibrate={p} (plan fits it to the model)")
    f = config_lib.Fields(obj, p, "see jaxinfer/calibration/cpu.json for the keys")
    latency = obj.get("collective_latency_s")
    return Calibration(
        bandwidth_fraction=f.number("bandwidth_fraction", 1.0),
        flops_fraction=f.number("flops_fraction", 1.0),
        step_overhead_s=f.number("step_overhead_s", 0.0, positive=False),
        collective_latency_s=None if latency is None else f.number("collective_latency_s", positive=False),
        scan_weight_passes=f.number("scan_weight_passes", 1.0),
        weight_only_passes=_passes_by_format(obj.get("weight_only_passes", {}), p),
        peak_gb_s=f.number("peak_gb_s"),
        peak_tflops=f.number("peak_tflops"),
        source=p.name,
        measured=str(obj.get("measured", "")),
    )


def _passes_by_format(obj, path: Path) -> tuple[tuple[str, float], ...]:
    formats = set(quant_lib.FORMATS)
    if not isinstance(obj, dict) or any(
        k not in formats or not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0 for k, v in obj.items()
    ):
        raise JaxinferError(
            f"{path}: weight_only_passes={obj!r}: expected an object of positive numbers keyed by weight format "
            f'({", ".join(sorted(formats))}), e.g. {{"fp8": 2.0}}'
        )
    return tuple(sorted((k, float(v)) for k, v in obj.items()))


# --- the model's figures on a mesh ----------------------------------------------------------------


@dataclasses.dataclass
class Memory:
    """One device's memory at pp = 1 for one (tp, ep, quant), from the shardings (no compile)."""

    setup: object
    quant: str
    stacked: int  # the layers' weights (split further 1/pp over pp)
    experts: int  # the routed experts among them
    other: int  # embedding, head, final norm: on every pipeline stage
    kv_per_token: int  # k and v of one token in every layer, as the engine's pool holds them (1/pp over pp)
    table: int  # the embedding table when it is only looked up (untied): a step reads one row per token

    def weights(self, pp: int) -> int:
        return self.stacked // pp + self.other

    def stacked_read(self, tokens: int) -> float:
        """Layer weights a step over `tokens` tokens reads (only the experts some token chose)."""
        cfg = self.setup.config
        if not cfg.num_experts:
            return self.stacked
        touched = 1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** tokens
        return self.stacked - self.experts + self.experts * touched

    def other_read(self, tokens: int) -> float:
        """The rest a step reads (explain.step_param_bytes less the layers): one embedding row per token."""
        vocab = self.setup.config.vocab_size
        return self.other - self.table + self.table * min(tokens, vocab) / vocab


@dataclasses.dataclass(frozen=True)
class Coll:
    """One collective of a compiled step: per token, per layer (in the layer loop) or per step."""

    kind: str
    bytes_per_token: float
    in_layer: bool
    weight: float  # 1 / the number of layer-loop bodies holding it (a pipeline has one per tick)
    axes: frozenset  # mesh axes its groups span (empty: not read)
    size: int  # devices in a group


@dataclasses.dataclass
class Program:
    """The collectives and activation peak of the prefill and decode programs compiled on one mesh."""

    pp: int
    decode: list
    prefill: list
    activation_bytes: int
    compiled: bool  # False: pp hand-overs derived from the pp=1 program (too few devices to compile pp=2)
    ring: list | None = None  # sp > 1: a prompt's first chunk, split over sp as ring attention


# Compiled programs by (model, tp, ep, pp, sp, dtype, prefill chunk): a process that plans twice compiles once.
_PROGRAMS: dict[tuple, Program] = {}


def read_collectives(compiled, mesh, num_layers: int, dtype, tokens: int) -> list[Coll]:
    """Every collective of a compiled program, per token, with the mesh axes it spans (as explain's
    step_report counts them: a widened reduction at the program's dtype, layer-loop ones per layer)."""
    text = compiled.as_text()
    itemsize = np.dtype(dtype).itemsize
    bodies = {name for name, n in hlo.loop_trip_counts(text).items() if n == num_layers}
    in_layers = hlo.reachable(text, bodies)
    out = []
    for c in hlo.collectives(text):
        size = c.bytes * itemsize // 4 if c.promoted else c.bytes
        groups = [list(g) for g in c.groups if g]
        if not groups:  # none given (or a form not read): one group of every device
            groups = [list(range(mesh.size))]
        inside = c.computation in in_layers
        out.append(
            Coll(
                c.kind,
                size / tokens,
                inside,
                1 / max(1, len(bodies)) if inside else 1.0,
                group_axes(groups, mesh),
                max(len(g) for g in groups),
            )
        )
    return out


# --- the planner ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    model: str
    gpu: str
    gpus_per_node: int
    nodes: int
    isl: int
    osl: int
    tpot_ms: float
    ttft_ms: float | None = None
    quant: str = "auto"
    hardware: str | None = None
    gpu_memory_utilization: float = 0.9
    calibrate: str | None = None


def check_request(r: Request) -> None:
    """Every input checked before any device work."""
    for name in ("gpus_per_node", "nodes", "isl", "osl"):
        value = getattr(r, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise JaxinferError(f"--{name}={value!r} must be an integer >= 1")
    if not (isinstance(r.tpot_ms, (int, float)) and math.isfinite(r.tpot_ms) and r.tpot_ms > 0):
        raise JaxinferError(f"--tpot_ms={r.tpot_ms!r} must be a positive number of milliseconds, e.g. --tpot_ms=50")
    if r.ttft_ms is not None and not (math.isfinite(r.ttft_ms) and r.ttft_ms > 0):
        raise JaxinferError(f"--ttft_ms={r.ttft_ms!r} must be a positive number of milliseconds, or left out")
    if not 0 < r.gpu_memory_utilization <= 1:
        raise JaxinferError(
            f"--gpu_memory_utilization={r.gpu_memory_utilization} must be in (0, 1], the share of each GPU's "
            "memory the weights, activations and KV cache may take (default 0.9)"
        )
    if r.quant not in ("auto", *QUANTS):
        raise JaxinferError(f"--quant={r.quant!r}; use one of auto, {', '.join(QUANTS)}")
    if r.gpu not in known_hardware(r.hardware):
        load_hardware(r.gpu, r.hardware)  # raises naming the known kinds
    cfg = model_config(r.model)
    if r.isl + r.osl > cfg.max_position_embeddings:
        raise JaxinferError(
            f"--isl={r.isl} + --osl={r.osl} = {r.isl + r.osl} tokens exceed {r.model}'s context of "
            f"{cfg.max_position_embeddings} (max_position_embeddings); shorten the prompt or the output"
        )


def model_config(model: str):
    """The config of a built-in name, a Hugging Face directory or a config.json alone (no weights read)."""
    from jaxinfer import checkpoint

    path = Path(model).expanduser()
    if model in config_lib.SHAPES:
        return config_lib.SHAPES[model]
    if path.is_file() and path.suffix == ".json":
        return config_lib.from_hf_config(config_lib.read_json_object(path, config_lib.HF_FIX), source=path)
    if path.is_dir() and (path / "config.json").is_file():
        return config_lib.load_hf_config(path)
    return checkpoint.resolve(model).config


def tp_problem(cfg, tp: int) -> str | None:
    """Why tensor parallelism of degree tp cannot split this model, or None."""
    if cfg.num_heads % tp:
        return f"does not divide the {cfg.num_heads} attention heads"
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        return f"neither divides nor is a multiple of the {cfg.num_kv_heads} kv heads"
    if cfg.dense_layers and cfg.intermediate_size % tp:
        return f"does not divide intermediate_size={cfg.intermediate_size}"
    if cfg.num_experts and cfg.moe_intermediate_size % tp:
        return f"does not divide the experts' hidden size {cfg.moe_intermediate_size}"
    return None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Planner:
    """Figures cached per (tp, ep, sp, quant) and programs per (tp, ep, pp in {1, 2}, sp)."""

    def __init__(self, req: Request, hw: Hardware, cal: Calibration, dtype: str):
        self.req, self.hw, self.cal, self.dtype = req, hw, cal, dtype
        self.cfg = model_config(req.model)  # prepare takes the config itself: nothing is registered by name
        self.memory: dict[tuple, Memory | str] = {}
        self.programs: dict[tuple, Program] = {}
        self.compiles = 0

    # -- figures --

    def memory_of(self, tp: int, ep: int, quant: str, sp: int = 1) -> Memory | str:
        key = (tp, ep, sp, quant)
        if key not in self.memory:
            from jaxinfer.runtime import prepare

            try:
                axes = dict(tp=tp, ep=ep, sp=sp)
                setup = prepare(self.cfg, axes, dtype=self.dtype, random_weights=True, quant=quant)
            except JaxinferError as e:
                self.memory[key] = str(e)
                return self.memory[key]
            stacked = explain.per_device_param_bytes(setup, setup.stacked)
            self.memory[key] = Memory(
                setup,
                quant,
                stacked,
                explain.per_device_param_bytes(setup, explain.EXPERT_PARAMS),
                explain.per_device_param_bytes(setup) - stacked,
                explain.pool_bytes_per_token(setup),  # the serving engine's page pool, per token (1/sp of it)
                0 if setup.config.tie_word_embeddings else explain.per_device_param_bytes(setup, ("embed",)),
            )
        return self.memory[key]

    def program(self, tp: int, ep: int, pp: int, sp: int = 1) -> Program:
        """Collectives and activation peak of (tp, ep, sp) compiled at pp = 1; for pp > 1 the same plus
        the collectives that cross pipeline stages, read from one program compiled at tp = ep = 1, pp = 2
        and the same sp (a stage hands over its activations whole, replicated over tp and ep, so their
        bytes do not depend on tp or ep, and more stages repeat the same hand-over once per tick; a
        prefill chunk's hand-over is split over sp, so its bytes do depend on sp). With sp > 1, the serving
        engine's programs over its page pool split over sp (`_compile_engine`)."""
        import jax

        key = (tp, ep, min(pp, 2), sp)
        if key in self.programs:
            return self.programs[key]
        if pp == 1:
            self.programs[key] = self._compile_engine(tp, ep, sp) if sp > 1 else self._compile(tp, ep, 1)
        elif len(jax.devices()) < 2 * sp:
            self.programs[key] = dataclasses.replace(self.program(tp, ep, 1, sp), pp=2, compiled=False)
        else:
            base = self.program(tp, ep, 1, sp)
            stages = self._compile_engine(1, 1, sp, 2) if sp > 1 else self._compile(1, 1, 2)
            crossing = lambda colls: [c for c in colls if "pp" in c.axes]  # noqa: E731
            self.programs[key] = Program(
                2,
                base.decode + crossing(stages.decode),
                base.prefill + crossing(stages.prefill),
                base.activation_bytes,
                True,
                ring=None if base.ring is None else base.ring + crossing(stages.ring),
            )
        return self.programs[key]

    def _compile(self, tp: int, ep: int, pp: int) -> Program:
        import jax

        from jaxinfer.runtime import buckets, prepare

        chunk = min(PREFILL_CHUNK, self.req.isl)
        shared = (self.cfg, tp, ep, pp, 1, self.dtype, chunk, len(jax.devices()))
        if shared in _PROGRAMS:
            return _PROGRAMS[shared]
        setup = prepare(self.cfg, dict(tp=tp, ep=ep, pp=pp), dtype=self.dtype, random_weights=True, quant="none")
        b, t, cache_len = buckets(1, chunk, 1, 1, setup.max_seq_len)
        cache = explain.abstract_cache(setup, b, cache_len)
        prefill, decode = explain.compile_steps(setup, cache, b, t, chunk)
        self.compiles += 1
        loop = self.cfg.num_layers // pp
        temp = [(p.memory_analysis().temp_size_in_bytes if p.memory_analysis() else 0) for p in (prefill, decode)]
        _PROGRAMS[shared] = Program(
            pp,
            read_collectives(decode, setup.mesh, loop, setup.dtype, b),
            read_collectives(prefill, setup.mesh, loop, setup.dtype, b * t),
            # what prefill needs beyond decode (both hold the same copies of weights the CPU backend
            # makes): the chunk's activations
            max(0, temp[0] - temp[1]),
            True,
        )
        return _PROGRAMS[shared]

    def _compile_engine(self, tp: int, ep: int, sp: int, pp: int = 1) -> Program:
        """The serving engine's programs at sp > 1 (the static path's decode does not split the KV over sp
        as the engine does; explain.compile_engine_steps): a prompt's first chunk as ring attention, a
        later chunk split over sp (per layer all-gathers of its queries, keys and values and one
        all-to-all of the partials over the ranks' pages) and a decode step (one all-gather per layer
        merging the ranks' partials); at pp > 1 inside each pipeline stage."""
        import jax

        from jaxinfer.runtime import buckets, prepare

        chunk = min(PREFILL_CHUNK, self.req.isl)
        shared = (self.cfg, tp, ep, pp, sp, self.dtype, chunk, len(jax.devices()))
        if shared in _PROGRAMS:
            return _PROGRAMS[shared]
        axes = dict(tp=tp, ep=ep, pp=pp, sp=sp)
        setup = prepare(self.cfg, axes, dtype=self.dtype, random_weights=True, quant="none")
        t = buckets(1, chunk, 1, 1, setup.max_seq_len)[1]  # the engine's chunk shapes: powers of two
        ring, later, decode = explain.compile_engine_steps(setup, t)
        self.compiles += 1
        temp = [(p.memory_analysis().temp_size_in_bytes if p.memory_analysis() else 0) for p in (ring, later, decode)]
        loop = self.cfg.num_layers // pp
        read = lambda p, tokens: read_collectives(p, setup.mesh, loop, setup.dtype, tokens)  # noqa: E731
        _PROGRAMS[shared] = Program(
            pp, read(decode, 1), read(later, t), max(0, max(temp[:2]) - temp[2]), True, ring=read(ring, t)
        )
        return _PROGRAMS[shared]

    # -- time --

    def _link(self, axes: frozenset, nodes_per_replica: int) -> tuple[float, float]:
        cross = "pp" in axes and nodes_per_replica > 1
        bw, lat = (self.hw.inter_bw, self.hw.inter_latency) if cross else (self.hw.intra_bw, self.hw.intra_latency)
        if self.cal.collective_latency_s is not None:
            lat = self.cal.collective_latency_s
        return bw, lat

    def _coll_time(self, c: Coll, tokens: float, n: int, nodes: int) -> float:
        bw, lat = self._link(c.axes, nodes)
        size = c.bytes_per_token * tokens
        if n <= 1:
            return 0.0
        moved = {
            "all-reduce": 2 * (n - 1) / n * size,
            "all-gather": (n - 1) / n * size,
            "all-to-all": (n - 1) / n * size,
            "reduce-scatter": (n - 1) * size,
        }.get(c.kind, size)
        return moved / bw + lat

    def step_time(
        self,
        mem: Memory,
        prog: Program,
        pp: int,
        tokens: int,
        kv_len: float,
        decode: bool,
        nodes: int,
        scanned: bool = False,
        ring: bool = False,
    ) -> float:
        """Seconds of one step on one replica: a decode step over `tokens` sequences of `kv_len` tokens of
        context each, or one sequence's prefill chunk of `tokens` tokens ending at `kv_len`. With pp
        stages the batch runs in M micro-batches over M + pp - 1 ticks (the bubble). With sp > 1 each
        rank holds 1/sp of the KV and reads the weights whole: a decode step runs its tokens on every rank
        against its share of the keys; a prefill chunk runs 1/sp of its tokens per rank through the
        weights, and its attention is 1/sp per rank too: a prompt's first chunk (`ring`) 1/sp of the
        queries against all the chunk's keys, a later chunk every query (gathered) against its own pages."""
        cal, hw, cfg = self.cal, self.hw, self.cfg
        tp, ep, sp = (mem.setup.mesh.shape[a] for a in ("tp", "ep", "sp"))
        seqs = tokens if decode else 1
        m = pipeline.microbatch_count(seqs, pp, mem.setup.microbatch_rows)  # (a prefill chunk: one sequence)
        mb = tokens // m  # tokens per micro-batch
        # Simulated CPU devices draw on one memory system and one set of cores: those working at once share it.
        active = tp * ep * sp * min(m, pp) if hw.shared else 1
        bw = hw.bandwidth * cal.bandwidth_fraction / active
        peak = hw.flops(mem.quant) * cal.flops_fraction / active
        kv = mem.kv_per_token / pp * (mb * kv_len if decode else kv_len)
        # matmul_flops' attention term is tokens x keys: a later chunk's mb x kv_len / sp per rank is the
        # ring's mb / sp x kv_len, so both prefill forms price as 1/sp of the tokens against every key
        flop_tokens, attended = (mb, kv_len / sp) if decode else (mb / sp, kv_len)
        # The matmuls read the weights once, or weight_only_passes times on the weight-only path; a
        # scanned stage's copy of each layer's weights adds scan_weight_passes - 1 reads at full speed.
        passes = cal.weight_passes(mem.quant, flop_tokens)
        if scanned:
            passes += cal.scan_weight_passes - 1
        layer_bytes = mem.stacked_read(flop_tokens) * passes / pp + kv  # the experts this rank's tokens chose
        layer_flops = explain.matmul_flops(mem.setup, flop_tokens, attended, 0) / pp
        colls = prog.decode if decode else prog.ring if ring else prog.prefill
        comm = sum(c.weight * self._coll_time(c, mb, c.size, nodes) for c in colls if c.in_layer) * cfg.num_layers / pp
        work = max(layer_bytes / bw, layer_flops / peak)
        if hw.shared and hw.cores and active > hw.cores:
            # More simulated devices than cores, meeting at every collective: a phase lasts as long as
            # ceil(active / cores) turns of one device's share, not active / cores of them.
            work *= math.ceil(active / hw.cores) * hw.cores / active
        tick = work + comm
        # Embedding lookup and head run outside the stages, on every device of the replica.
        every = tp * ep * sp * pp if hw.shared else 1
        other = max(
            mem.other_read(tokens) * every / (hw.bandwidth * cal.bandwidth_fraction),
            explain.matmul_flops(mem.setup, 0, 0, seqs) * every / (hw.flops(mem.quant) * cal.flops_fraction),
        )
        outside = 0.0
        permutes = [c for c in colls if c.kind == "collective-permute" and not c.in_layer]
        for c in colls:
            if c.in_layer or c in permutes:
                continue
            outside += self._coll_time(c, tokens, pp if "pp" in c.axes else c.size, nodes)
        if pp > 1:
            if prog.compiled:
                # The pp=2 program (batch 1: one micro-batch) hands over once; with pp stages and M
                # micro-batches every tick but the last hands one micro-batch on: M + pp - 2 hand-overs.
                outside += (m + pp - 2) * sum(self._coll_time(c, mb, 2, nodes) for c in permutes)
            else:
                # No pp program compiled (too few devices): each hand-over moves one micro-batch's
                # activations (a prefill chunk's split over sp), and the last stage's output is summed over
                # the stages once.
                width = cfg.hidden_size * np.dtype(mem.setup.dtype).itemsize / (1 if decode else sp)
                hand = Coll("collective-permute", width, False, 1.0, frozenset({"pp"}), 2)
                last = Coll("all-reduce", width, False, 1.0, frozenset({"pp"}), pp)
                outside += (m + pp - 2) * self._coll_time(hand, mb, 2, nodes) + self._coll_time(last, tokens, pp, nodes)
        return cal.step_overhead_s + (m + pp - 1) * tick + other + outside

    # -- the search --

    def sps(self, tp: int, ep: int) -> list[int]:
        """The sp degrees searched beside (tp, ep), at every pp: 1, and when the prompt spans several
        prefill chunks (where splitting it pays), powers of two while tp * ep * sp stays inside a node:
        the ring's permutes, a later chunk's all-gathers and all-to-all and decode's all-gather ride
        NVLink like tp's all-reduces, and only pp's hand-overs cross nodes (the mesh puts pp outside tp,
        ep and sp)."""
        if self.req.isl <= PREFILL_CHUNK:
            return [1]
        return [1] + [1 << k for k in range(1, 8) if tp * ep << k <= self.req.gpus_per_node]

    def candidates(self, quants):
        """(tp, ep, pp, quant, sp) by the search rules, and one line per family the rules rule out."""
        cfg, gpn, total = self.cfg, self.req.gpus_per_node, self.req.gpus_per_node * self.req.nodes
        out, rejected = [], []
        wide = [t for t in divisors(cfg.num_heads) if t > gpn]
        if wide:
            rejected.append(
                f"tp={','.join(map(str, wide))}: TP across nodes (tp must be <= --gpus_per_node={gpn}); "
                "cross nodes with pp instead"
            )
        for tp in (t for t in divisors(cfg.num_heads) if t <= gpn):
            why = tp_problem(cfg, tp)
            if why:
                rejected.append(f"tp={tp}: {why}")
                continue
            for ep in divisors(cfg.num_experts) if cfg.num_experts else [1]:
                if tp * ep > gpn:
                    continue  # ep stays inside a node beside tp
                pps = divisors(cfg.num_layers) if not (cfg.moe_layers and cfg.dense_layers) else [1]
                for pp in pps:
                    if tp * ep * pp > total:
                        break
                    for sp in self.sps(tp, ep):
                        n = tp * ep * sp * pp
                        if n > total or (n > gpn and n % gpn):
                            continue  # a replica spanning nodes takes whole nodes
                        out.extend((tp, ep, pp, q, sp) for q in quants)
        if cfg.num_experts and gpn < cfg.num_experts:
            rejected.append(f"ep > {gpn}: expert parallelism stays inside a node (all-to-all over NVLink)")
        return out, rejected

    def evaluate(self, tp, ep, pp, quant, sp: int = 1) -> dict | str:
        req, hw = self.req, self.hw
        mem = self.memory_of(tp, ep, quant, sp)
        if isinstance(mem, str):
            return mem
        gpr = tp * ep * pp * sp
        nodes = max(1, -(-gpr // req.gpus_per_node))
        replicas = (req.gpus_per_node * req.nodes) // gpr
        usable = hw.memory * req.gpu_memory_utilization
        weights = mem.weights(pp)
        kv_tok = mem.kv_per_token // pp
        seq_len = req.isl + req.osl
        # compile only what the weights and one sequence leave room for
        activation = self.program(tp, ep, pp, sp).activation_bytes if weights + kv_tok * seq_len <= usable else 0
        kv_budget = usable - weights - activation
        seqs = int(kv_budget // (kv_tok * seq_len)) if kv_budget > 0 else 0
        row = dict(
            tp=tp,
            pp=pp,
            ep=ep,
            sp=sp,
            replicas=replicas,
            quant=quant,
            gpus_per_replica=gpr,
            nodes_per_replica=nodes,
            weight_bytes_per_gpu=int(weights),
            kv_bytes_per_gpu=int(max(0, seqs) * kv_tok * seq_len),
            max_concurrent_seqs=seqs,
        )
        if seqs < 1:
            row["short_bytes"] = int(weights + activation + kv_tok * seq_len - usable)
            return row
        prog = self.program(tp, ep, pp, sp)
        ctx = req.isl + req.osl / 2  # mean context over a sequence's decode
        tpot = lambda b: self.step_time(mem, prog, pp, b, ctx, True, nodes)  # noqa: E731
        chunk = min(PREFILL_CHUNK, req.isl)
        spans = [(s, min(chunk, req.isl - s)) for s in range(0, req.isl, chunk)]
        # over sp the engine runs a prompt's first chunk as ring attention when it has 2 sp tokens or more
        ring = sp > 1 and spans[0][1] >= 2 * sp
        prefill = sum(self.step_time(mem, prog, pp, n, s + n, False, nodes, ring=ring and s == 0) for s, n in spans)
        target = req.tpot_ms / 1e3
        # The largest batch the pool holds whose TPOT meets the target. With pp stages, batches of a
        # multiple of pp fill every micro-batch (M = pp); TPOT grows with the batch along those.
        step = pp if seqs >= pp else 1
        batch = 1
        if tpot(step) <= target:
            lo, hi = 1, seqs // step
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if tpot(mid * step) <= target else (lo, mid - 1)
            batch = lo * step
        else:
            batch = max((b for b in range(1, min(step, seqs) + 1) if tpot(b) <= target), default=1)
        t = tpot(batch)
        # a sequence's time on the replica: its prefill, and osl decode steps shared with batch - 1 others
        per_replica = batch * req.osl / (req.osl * t + batch * prefill)
        meets = t <= target and (req.ttft_ms is None or prefill * 1e3 <= req.ttft_ms)
        row.update(
            ttft_ms=prefill * 1e3,
            tpot_ms=t * 1e3,
            tokens_per_s_per_gpu=per_replica / gpr,
            meets_targets=bool(meets),
            batch=batch,
        )
        return row


def _rank(row: dict) -> tuple:
    return (
        -row["tokens_per_s_per_gpu"],
        row["nodes_per_replica"],
        row["gpus_per_replica"],
        PRECISION[row["quant"]],
    )


def plan(req: Request) -> dict:
    """Every feasible configuration with its predicted figures, the recommended one and why, the
    rejected families, and the inputs."""
    check_request(req)
    import jax

    from jaxinfer import runtime

    hw_table = known_hardware(req.hardware)
    is_cpu = any(v == "measured" for v in hw_table[req.gpu].values() if isinstance(v, str))
    runtime.ensure_devices(max(2 * req.gpus_per_node, 8))
    default = load_calibration(str(hw_table[req.gpu].get("calibration", "gpu.json")))
    hw = load_hardware(req.gpu, req.hardware, num_devices=req.gpus_per_node, pinned=default.pins())
    dtype = "float32" if is_cpu else "bfloat16"
    quants = AUTO_QUANTS if req.quant == "auto" else (req.quant,)
    if req.quant == "auto" and hw.fp8_flops == 0 and not is_cpu:
        quants = ("none", "int8")
    cal = calibration_from(req.calibrate, req, hw, dtype) if req.calibrate else default
    planner = Planner(req, hw, cal, dtype)
    t0 = time.perf_counter()
    cands, rejected = planner.candidates(quants)
    rows, misfits = [], {}
    for tp, ep, pp, q, sp in cands:
        r = planner.evaluate(tp, ep, pp, q, sp)
        if isinstance(r, str):
            rejected.append(f"tp={tp} ep={ep} sp={sp} quant={q}: {r}")
            continue
        if r["max_concurrent_seqs"] < 1:
            misfits.setdefault((tp, ep, sp, q), []).append(r)
            continue
        rows.append(r)
    for (tp, ep, sp, q), rs in misfits.items():
        worst = max(rs, key=lambda r: r["pp"])
        pps = ",".join(str(r["pp"]) for r in rs)
        rejected.append(
            f"{_family(tp, ep, sp)} pp={pps} {q}: does not fit: at pp={worst['pp']} "
            f"{worst['short_bytes'] / 1e9:.2f} GB per GPU over {req.gpu_memory_utilization:.0%} of "
            f"{hw.memory / 1e9:.0f} GB (weights {worst['weight_bytes_per_gpu'] / 1e9:.1f} GB + one sequence's KV)"
        )
    if not rows:
        raise JaxinferError(_fits_nowhere(planner, quants))
    rows.sort(key=_rank)
    good = [r for r in rows if r["meets_targets"]]
    if not good:
        best = min(rows, key=lambda r: (r["tpot_ms"], _rank(r)))
        raise JaxinferError(
            f"no configuration meets --tpot_ms={req.tpot_ms:g}"
            + (f" and --ttft_ms={req.ttft_ms:g}" if req.ttft_ms else "")
            + f": the best achievable is TPOT {best['tpot_ms']:.1f} ms, TTFT {best['ttft_ms']:.0f} ms with "
            f"{_describe(best)} at batch 1; relax the target(s) to at least those, quantize (--quant=auto) "
            "or use faster GPUs"
        )
    rec = good[0]
    for (tp, ep, sp, q), group in _families(rows).items():
        if not any(r["meets_targets"] for r in group):
            fast = min(group, key=lambda r: r["tpot_ms"])
            # TPOT missed everywhere: the fastest decode; else the TTFT is what fails: the shortest one.
            quick = min(group, key=lambda r: r["ttft_ms"])
            reason = (
                f"misses the TPOT target: predicted {fast['tpot_ms']:.1f} ms vs {req.tpot_ms:g} ms asked"
                if fast["tpot_ms"] > req.tpot_ms
                else f"misses the TTFT target: predicted {quick['ttft_ms']:.0f} ms at best vs {req.ttft_ms:g} ms asked"
            )
            rejected.append(f"{_family(tp, ep, sp)} {q} (any pp): {reason}")
    rejected.append(_sp_note(req))
    why = _why(rec, good, rows, req)
    log.info(
        "planned %d configurations, %d meshes compiled, in %.1fs", len(rows), planner.compiles, time.perf_counter() - t0
    )
    configs = [{k: r[k] for k in CONFIG_KEYS} for r in rows]
    return {
        "configs": configs,
        "recommended": {k: rec[k] for k in CONFIG_KEYS},
        "why": why,
        "inputs": {
            **dataclasses.asdict(req),
            "hardware_name": hw.name,
            "dtype": dtype,
            "calibration": dataclasses.asdict(cal),
            "prefill_chunk": min(PREFILL_CHUNK, req.isl),
            "devices": len(jax.devices()),
        },
        "_rows": rows,
        "_rejected": rejected,
    }


def _families(rows):
    out: dict[tuple, list] = {}
    for r in rows:
        out.setdefault((r["tp"], r["ep"], r["sp"], r["quant"]), []).append(r)
    return out


def _family(tp: int, ep: int, sp: int) -> str:
    return f"tp={tp}" + (f" ep={ep}" if ep > 1 else "") + (f" sp={sp}" if sp > 1 else "")


def _describe(r: dict) -> str:
    parts = [f"tp={r['tp']}", f"pp={r['pp']}"] + [f"{a}={r[a]}" for a in ("ep", "sp") if r[a] > 1]
    return " ".join(parts) + f" {r['quant'] if r['quant'] != 'none' else 'unquantized'}"


def _sp_note(req: Request) -> str:
    """What the search did with sequence parallelism, and why not more."""
    chunk = min(PREFILL_CHUNK, req.isl)
    if req.isl <= PREFILL_CHUNK:
        return (
            f"sp > 1: not searched: the prompt ({req.isl} tokens) is one prefill chunk of {chunk}; sequence "
            f"parallelism splits long prompts (searched when isl > {PREFILL_CHUNK})"
        )
    return (
        f"sp > 1: searched at every pp, inside a node (tp*ep*sp <= {req.gpus_per_node}: the ring's permutes and "
        "the per-layer all-gathers and all-to-all stay on NVLink; only pp crosses nodes); with sp the engine's "
        f"page pool is split over sp, a prompt's first chunk of {chunk} tokens runs as ring attention (inside each "
        "pipeline stage), later chunks split their tokens over sp too, and each rank attends to its own pages"
    )


def _why(rec: dict, good: list, rows: list, req: Request) -> str:
    s = (
        f"{_describe(rec)} x {rec['replicas']} replicas: the highest predicted output tokens/s per GPU "
        f"({rec['tokens_per_s_per_gpu']:.0f}) among the {len(good)} configurations meeting TPOT <= {req.tpot_ms:g} ms"
        + (f" and TTFT <= {req.ttft_ms:g} ms" if req.ttft_ms else "")
        + f"; it decodes {rec['batch']} sequences at once at {rec['tpot_ms']:.1f} ms per token"
        + f" (its KV pool holds {rec['max_concurrent_seqs']} of {req.isl}+{req.osl} tokens)"
    )
    if rec["nodes_per_replica"] == 1:
        s += ", and a replica stays inside one node"
    whole = [r for r in rows if r["sp"] == 1]
    if rec["sp"] > 1 and whole:
        fast = min(whole, key=lambda r: r["ttft_ms"])
        s += (
            f"; splitting each prompt over sp={rec['sp']} gives a TTFT of {rec['ttft_ms']:.0f} ms, where the "
            f"shortest at sp = 1 is {fast['ttft_ms']:.0f} ms ({_describe(fast)})"
        )
    unq = [r for r in good if r["quant"] == "none"]
    if rec["quant"] != "none" and unq:
        s += f"; unquantized, the best is {unq[0]['tokens_per_s_per_gpu']:.0f} tokens/s per GPU ({_describe(unq[0])})"
    return s + "."


def _fits_nowhere(planner: Planner, quants) -> str:
    """The smallest cluster that would hold the model, from the pp = 1 shardings split over more stages."""
    req, hw = planner.req, planner.hw
    usable = hw.memory * req.gpu_memory_utilization
    cfg, gpn = planner.cfg, req.gpus_per_node
    for nodes in range(req.nodes + 1, 1025):
        for q in quants:
            for tp in sorted((t for t in divisors(cfg.num_heads) if t <= gpn and not tp_problem(cfg, t)), reverse=True):
                # the widest expert split beside tp inside a node
                ep = max((e for e in divisors(cfg.num_experts) if tp * e <= gpn), default=1) if cfg.num_experts else 1
                mem = planner.memory_of(tp, ep, q)
                if isinstance(mem, str):
                    continue
                act = planner.program(tp, ep, 1).activation_bytes
                for pp in divisors(cfg.num_layers):
                    n = tp * ep * pp
                    if n > nodes * gpn or (n > gpn and n % gpn):
                        continue
                    need = mem.weights(pp) + act + mem.kv_per_token // pp * (req.isl + req.osl)
                    if need <= usable:
                        return (
                            f"{req.model} does not fit {req.nodes} node(s) of {gpn} {req.gpu} "
                            f"({req.gpu_memory_utilization:.0%} of {hw.memory / 1e9:.0f} GB each) with quant in "
                            f"{list(quants)}; the smallest cluster that holds it is {nodes} nodes (tp={tp} pp={pp} "
                            + (f"ep={ep} " if ep > 1 else "")
                            + f"{q}: {mem.weights(pp) / 1e9:.1f} GB of weights per GPU); pass --nodes={nodes}"
                            + ("" if req.quant == "auto" else " or --quant=auto")
                        )
    return f"{req.model} does not fit even 1024 nodes of {gpn} {req.gpu}"


# --- calibration from bench -----------------------------------------------------------------------


def calibration_from(path: str | Path, req: Request, hw: Hardware, dtype: str) -> Calibration:
    """A calibration file as is, or one fitted to a `jaxinfer bench --json` report: the bandwidth and
    FLOP/s fractions and the per-step overhead that make the planner's TPOT for the bench's mesh and
    batches closest to the measured medians (least squares on the log). The bench must be of the
    planned model (or name it under "model")."""
    p = Path(path)
    if not p.is_file():
        return load_calibration(path)
    obj = config_lib.read_json_object(p, "pass a file written by `jaxinfer bench --json`")
    if "rows" not in obj:
        return load_calibration(p)
    base = load_calibration(hw.calibration)
    return fit(obj, dataclasses.replace(req, model=obj.get("model", req.model)), hw, dtype, str(p), base)


def _bench_model(report: dict, req: Request, hw: Hardware, dtype: str, cal: Calibration, source: str):
    """The planner's TPOT for the bench report's mesh and batches: f(calibration, batch) -> seconds."""
    mesh = report.get("mesh", {})
    rows = report.get("rows") or []
    if not rows or any(k not in r for r in rows for k in ("batch", "tpot_median_s")):
        raise JaxinferError(
            f"{source}: its rows need 'batch' and 'tpot_median_s' (write it with `jaxinfer bench --json`)"
        )
    tp, pp, ep = mesh.get("tp", 1), mesh.get("pp", 1), mesh.get("ep", 1)
    r = dataclasses.replace(req, isl=report.get("prompt_len", req.isl), osl=report.get("gen_len", req.osl))
    planner = Planner(r, hw, cal, dtype)
    mem = planner.memory_of(tp, ep, "none")
    if isinstance(mem, str):
        raise JaxinferError(f"{source}: the bench's mesh {mesh} does not fit the model: {mem}")
    prog = planner.program(tp, ep, pp)
    # the bench decodes after a prompt of prompt_len, up to prompt_len + gen_len: its mean context
    ctx = r.isl + r.osl / 2
    scanned = report.get("layers") == "scanned"

    def tpot(c: Calibration, batch: int) -> float:
        planner.cal = c
        return planner.step_time(mem, prog, pp, batch, ctx, True, 1, scanned)

    return tpot, [(x["batch"], x["tpot_median_s"]) for x in rows]


def fit(
    report: dict,
    req: Request,
    hw: Hardware,
    dtype: str,
    source: str,
    base: Calibration | None = None,
    overhead: float | None = None,
):
    """bandwidth_fraction, flops_fraction and step_overhead_s minimising the squared log error of the
    planner's TPOT against the report's rows (a grid: the model is a max of terms, not linear). With
    `overhead` (seconds, measured apart: benchmarks/plan_check.py times the same layers at tiny widths)
    only the two fractions are fitted, on a finer grid. A bench of one mesh cannot tell a fixed cost per
    step from slower weight reads, which add alike at every batch, and a pipeline pays the one once per
    step but the other once per tick."""
    base = base or Calibration()
    tpot, measured = _bench_model(report, req, hw, dtype, base, source)
    best = (float("inf"), base)
    grid = np.geomspace(0.05, 1.0, 20 if overhead is None else 121)
    overheads = [0.0, *np.geomspace(1e-5, 0.05, 20)] if overhead is None else [overhead]
    for bwf in grid:
        for ff in grid:
            for o in overheads:
                c = dataclasses.replace(
                    base,
                    bandwidth_fraction=float(bwf),
                    flops_fraction=float(ff),
                    step_overhead_s=float(o),
                    source=source,
                )
                e = sum(math.log(tpot(c, b) / t) ** 2 for b, t in measured)
                if e < best[0]:
                    best = (e, c)
    return best[1]


def fit_weight_only_passes(planner, mem, prog, batch: int, kv_len: float, measured_s: float) -> float:
    """The weight_only_passes of `mem`'s format that makes the planner's decode step at `batch` (one
    device, pp = 1) take `measured_s` (a TPOT measured on the GPU: benchmarks/gpu_check.py stage p)."""
    trial = copy.copy(planner)  # shares the cached figures and programs
    lo, hi = 0.25, 8.0
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        trial.cal = dataclasses.replace(planner.cal, weight_only_passes=((mem.quant, mid),))
        t = trial.step_time(mem, prog, 1, batch, kv_len, True, 1)
        lo, hi = (mid, hi) if t < measured_s else (lo, mid)
    return math.sqrt(lo * hi)


# --- output ---------------------------------------------------------------------------------------


def format_plan(p: dict) -> str:
    req = p["inputs"]
    gb = 1e9
    lines = [
        f"{req['model']} on {req['nodes']} node(s) x {req['gpus_per_node']} {req['gpu']} ({req['hardware_name']}), "
        f"isl {req['isl']}, osl {req['osl']}, TPOT <= {req['tpot_ms']:g} ms"
        + (f", TTFT <= {req['ttft_ms']:g} ms" if req["ttft_ms"] else "")
        + f"; {req['dtype']} activations, memory {req['gpu_memory_utilization']:.0%} usable; "
        f"calibration: {req['calibration']['source']}",
        "| tp | pp | ep | sp | replicas | quant | GPUs/replica | nodes/replica | weights/GPU GB | KV/GPU GB "
        "| max seqs | batch | TTFT ms | TPOT ms | tok/s/replica | tok/s/GPU | meets |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in p["_rows"]:
        lines.append(
            f"| {r['tp']} | {r['pp']} | {r['ep']} | {r['sp']} | {r['replicas']} | {r['quant']} | "
            f"{r['gpus_per_replica']} | {r['nodes_per_replica']} | {r['weight_bytes_per_gpu'] / gb:.1f} | "
            f"{r['kv_bytes_per_gpu'] / gb:.1f} | {r['max_concurrent_seqs']} | {r['batch']} | {r['ttft_ms']:.0f} | "
            f"{r['tpot_ms']:.1f} | {r['tokens_per_s_per_gpu'] * r['gpus_per_replica']:.0f} | "
            f"{r['tokens_per_s_per_gpu']:.0f} | {'yes' if r['meets_targets'] else 'no'} |"
        )
    lines.append(f"recommended: {p['why']}")
    lines += [f"rejected: {x}" for x in p["_rejected"]]
    return "\n".join(lines)


def public(p: dict) -> dict:
    """The JSON object: configs, recommended, why, inputs."""
    return {k: p[k] for k in ("configs", "recommended", "why", "inputs")}


def to_json(p: dict) -> str:
    return json.dumps(public(p))
