"""The GPU compile gate, on CPU: every Pallas kernel at every shape in tests/kernel_shapes.py compiles
for sm_90 (Triton, H100) without spills and on bf16 tensor cores, under jax 0.11.2 (the GPU image's
version) in a Python 3.12 venv this test builds once (.venv-sm90); the kernels' interpret-mode tests
pass there too. See tests/sm90_gate.py for what it proves and what it does not."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import sm90_gate

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-sm90"
REQUIREMENTS = ROOT / "tests" / "sm90-requirements.txt"


def _base_python() -> str | None:
    """A Python 3.12: $JAXINFER_SM90_PYTHON, python3.12 on PATH, or one pyenv installed."""
    pyenv = sorted(Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")).glob("versions/3.12*/bin/python3.12"))
    for candidate in (os.environ.get("JAXINFER_SM90_PYTHON"), shutil.which("python3.12"), *map(str, pyenv)):
        if candidate and subprocess.run([candidate, "-c", "import venv"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="session")
def gate_python() -> Path:
    python, stamp = VENV / "bin" / "python", VENV / "requirements.txt"
    if python.exists() and stamp.exists() and stamp.read_text() == REQUIREMENTS.read_text():
        return python
    base = _base_python()
    if base is None:
        message = "the sm_90 gate needs Python 3.12 (python3.12 on PATH or JAXINFER_SM90_PYTHON)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    subprocess.run([base, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    shutil.copy(REQUIREMENTS, stamp)
    return python


@pytest.fixture(scope="session")
def gate(gate_python, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sm90")
    r = subprocess.run(
        [str(gate_python), "tests/sm90_gate.py", "--out", str(out), "--jobs", str(os.cpu_count() or 2)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    print(r.stdout)
    if not (out / "results.json").exists():
        pytest.fail(f"the gate wrote no results (exit {r.returncode}): {r.stderr[-3000:]}")
    return {e["name"]: e for e in json.loads((out / "results.json").read_text())}


@pytest.mark.parametrize("name", [c["name"] for c in sm90_gate.cases()])
def test_kernel_compiles_for_sm90(gate, name):
    entry = gate[name]
    assert entry["compiled"], entry["error"]
    assert not entry["problems"], sm90_gate.row(entry)
    assert all(k["arch"] == "sm_90a" for k in entry["kernels"])


# The quantized-cache tests that need only jax and the kernel (no model, no transformers).
KV_QUANT_KERNEL_TESTS = (
    "test_kernel_equals_reference_on_quantized_pools",
    "test_quantized_reference_is_attention_over_the_dequantized_pools",
    "test_validator_names_quantized_pool_mistakes",
    "test_round_trip_error_bounds",
)


def test_kernel_interpret_tests_pass_on_jax_0_11(gate_python):
    r = subprocess.run(
        [str(gate_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_paged_attention.py"]
        + ["tests/test_moe_kernel.py", "tests/test_fp8_matmul.py"]
        + [f"tests/test_kv_quant.py::{t}" for t in KV_QUANT_KERNEL_TESTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    version = subprocess.run(
        [str(gate_python), "-c", "import jax; print(jax.__version__)"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == "0.11.2", version.stdout
