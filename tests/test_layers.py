"""The code layers one way: every import (module level or inside a function) points down this table,
and no modules import each other in a circle."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jaxinfer", "models", "pallas_kernels", "cpu_kernels")

# Lower number = lower layer. A module may import its own layer or lower ones.
LAYERS = {
    "jaxinfer.errors": 0,
    "pallas_kernels.*": 0,  # kernels import nothing of ours
    "cpu_kernels": 0,
    "cpu_kernels.*": 0,
    "jaxinfer.config": 1,
    "jaxinfer.sampling": 1,
    "jaxinfer.compile_cache": 1,
    "jaxinfer.distributed": 1,
    "jaxinfer.lockstep": 1,  # the step channel of an engine spanning processes (jax.distributed's key-value store)
    "jaxinfer.tokenizer": 2,
    "jaxinfer.sharding": 2,
    "models.*": 3,  # models see config, sharding rules and kernels
    "jaxinfer.hlo": 3,
    "jaxinfer.pipeline": 3,
    "jaxinfer.checkpoint": 4,
    "jaxinfer.qcheckpoint": 4,  # the quantized checkpoint formats checkpoint reads
    "jaxinfer.steps": 4,
    "jaxinfer.kernels": 4,
    "jaxinfer.outputs": 4,
    "jaxinfer.runtime": 5,
    "jaxinfer.scheduler": 5,  # host only: numpy, outputs, sampling (no jax)
    "jaxinfer.executor": 5,  # runs a scheduler's plan with steps
    "jaxinfer.engine": 6,
    "jaxinfer.llm": 7,
    "jaxinfer.explain": 7,
    "jaxinfer.bench": 8,
    "jaxinfer.plan": 8,  # beside bench: explain's figures, bench's peaks and results
    # the OpenAI server: request checking and the backend interface, the router, then the replica
    # workers (each runs an LLM), then the HTTP app that the CLI starts
    "jaxinfer.serving": 8,
    "jaxinfer.serving.protocol": 8,
    "jaxinfer.serving.backend": 8,
    "jaxinfer.serving.router": 8,
    "jaxinfer.serving.metrics": 8,
    "jaxinfer.serving.replicas": 8,
    "jaxinfer.serving.app": 8,
    "jaxinfer.cli": 9,
    "jaxinfer.__main__": 10,
    "jaxinfer": 10,
}


def _layer(module: str) -> int:
    if module in LAYERS:
        return LAYERS[module]
    return LAYERS[module.split(".")[0] + ".*"]


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """Our modules `path` imports: `from jaxinfer import steps` is jaxinfer.steps, `from jaxinfer.llm
    import LLM` is jaxinfer.llm, `from jaxinfer import JaxinferError` the package itself."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                member = f"{node.module}.{alias.name}"
                out.add(member if _is_module(member) else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    g = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).glob("*.py"):
            mod = _module_of(path)
            g[mod] = {m for m in _imports(path) if m != mod}
    return g


def test_every_import_points_down():
    upward = [
        f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})"
        for mod, deps in graph().items()
        for dep in deps
        if _layer(dep) > _layer(mod)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_importing_a_kernel_or_the_package_loads_no_runtime():
    code = (
        "import sys, jaxinfer, pallas_kernels.paged_attention, pallas_kernels.moe, cpu_kernels.int8_matmul; "
        "print(sorted(m for m in sys.modules if m.startswith(('jaxinfer.', 'flax'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout
