"""benchmarks/gpu_check.py cannot rot: its CPU smoke mode runs every stage end to end, its schedule skips
and kills stages as promised, and its MBU accounting counts what a decode step reads."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STAGES = ("env", "a", "d", "f", "q", "p", "b", "s", "c", "peer", "e")  # gpu_check's run order
ROW_KEYS = {"stage", "name", "status", "detail", "elapsed_s", "smoke"}


def _run(tmp_path: Path, *args: str, timeout: float = 300, stall_s: float = 0):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on the GPU machine
    env.update(OUT=str(tmp_path), PYTHONPATH=str(ROOT), GPU_CHECK_STALL_S=str(stall_s))
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = (tmp_path / "gpu_check.jsonl").read_text().splitlines()
    return r, [json.loads(line) for line in lines]


def test_cpu_smoke_runs_every_stage(tmp_path):
    r, rows = _run(tmp_path, "--cpu_smoke")
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-2000:]
    assert out.startswith("[env] info     versions: CPU smoke run"), out[:500]
    for row in rows:
        assert ROW_KEYS <= set(row), row
        assert row["smoke"] is True
        assert f"[{row['stage']}]" in out and row["name"] in out  # printed, not only written
    by_stage = {s: [row for row in rows if row["stage"] == s] for s in STAGES}
    assert all(by_stage.values()), {s: len(v) for s, v in by_stage.items()}
    assert not [row for row in rows if row["status"] in ("fail", "error", "missed")], out[-4000:]

    correctness = by_stage["a"]
    assert len(correctness) == 12 and all(row["status"] == "pass" for row in correctness)
    assert {row["tolerance"] for row in correctness} == {2e-5, 2e-2}

    attention = [row for row in by_stage["b"] if row["status"] != "skip"]
    assert {row["impl"] for row in attention} == {"ours", "jax", "xla"}
    for row in attention:
        assert row["unit"] == "GB/s" and row["value"] > 0 and "speed meaningless" in row["detail"]
    matmul = by_stage["c"]
    assert {row["impl"] for row in matmul if row["status"] == "measured"} == {"ours", "ragged_dot"}
    assert all(row["status"] == "skip" for row in matmul if "jax" in row["name"])  # Mosaic GPU: Hopper only

    for stage in ("d", "e"):
        info, *batches = [row for row in by_stage[stage] if "vs transformers" not in row["name"]]
        assert info["status"] == "pass" and info["kernel_plugged"], info
        assert batches and all(row["tpot_ms"] > 0 and row["mbu"] > 0 and row["pure_steps"] >= 1 for row in batches)
    peer = [row for row in by_stage["peer"] if "tpot_ms" in row]
    assert [row["batch"] for row in peer] == [row["batch"] for row in by_stage["d"] if "mbu" in row]
    assert [row for row in by_stage["d"] if row["name"].startswith("TPOT vs transformers")]
    assert "summary after" in out
    assert (tmp_path / "gpu_check_logs" / "d.log").is_file()


def test_deadline_skips_stages_with_a_row_each(tmp_path):
    r, rows = _run(tmp_path, "--deadline_s=0", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    skipped = [row for row in rows if row["status"] == "skip"]
    assert [row["stage"] for row in skipped] == list(STAGES)
    assert all("deadline" in row["detail"] for row in skipped)


def test_stage_killed_at_its_budget_keeps_its_rows(tmp_path):
    r, rows = _run(tmp_path, "--cpu_smoke", "--stages=env", "--budget=env=12", timeout=60, stall_s=120)
    assert r.returncode == 1
    env = [row for row in rows if row["stage"] == "env"]
    assert [row["name"] for row in env] == [
        "versions",
        "gpu",
        "schedule",
        "device",
        "bandwidth",
        "jax GPU kernels",
        "stage env",
    ]
    assert env[-1]["status"] == "error" and "killed at its limit of 12 s" in env[-1]["detail"], env[-1]
    assert not [row for row in rows if row["stage"] != "env"]


def test_bad_budget_flag_is_refused(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--budget=zz=3"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "STAGE=SECONDS" in r.stderr


def _gpu_check():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return gpu_check


@pytest.mark.parametrize("model", ["llama3-8b", "qwen3-30b-a3b"])
def test_decode_reads_gathered_embedding_rows_and_touched_experts(model):
    from jaxinfer.runtime import prepare

    setup = prepare(model, dict(tp=1), dtype="bfloat16", random_weights=True)  # abstract: no weights made
    cfg = setup.config
    row = cfg.hidden_size * 2
    table = cfg.vocab_size * row
    experts = cfg.expert_param_count(cfg.num_experts) * 2
    for tokens in (1, 16):
        touched = 1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** tokens if cfg.num_experts else 0
        want = cfg.param_count * 2 - table + tokens * row - experts + experts * touched
        assert _gpu_check().weights_read(setup, tokens) == pytest.approx(want, rel=1e-9)


def test_nameplate_bandwidth_only_for_known_gpus():
    from jaxinfer.bench import nameplate_bandwidth

    def dev(platform, kind):
        return types.SimpleNamespace(platform=platform, device_kind=kind)

    assert nameplate_bandwidth(dev("gpu", "NVIDIA H100 80GB HBM3")) == 3.35e12
    assert nameplate_bandwidth(dev("gpu", "NVIDIA H200")) == 4.8e12
    assert nameplate_bandwidth(dev("gpu", "NVIDIA GH200 480GB")) is None  # unknown: the measured peak is used
    assert nameplate_bandwidth(dev("cpu", "cpu")) is None
