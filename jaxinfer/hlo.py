"""Reading collectives out of compiled HLO text: what a step really moves between devices (and the
shapes of its matmuls: how much of the work one device does)."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from jaxinfer.sharding import WIDENED_SCOPE

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "s8": 1,
    "u8": 1,
    "pred": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
_OP = re.compile(r"^\s*(?:ROOT )?%?(\S+) = (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\(.*op_name=\"([^\"]+)\"")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    computation: str  # the HLO computation it sits in (a scanned layer's body appears once)
    shape: str
    bytes: int  # size of the result on one device
    promoted: bool = False  # the backend widened a low-precision reduction (XLA:CPU does for bf16)
    groups: tuple = ()  # its device groups (source/target pairs for a permute); () when none is named

    def axes(self, mesh) -> frozenset:
        """The mesh axes its groups span (`group_axes`)."""
        return group_axes([list(g) for g in self.groups], mesh)


def _result_bytes(result: str) -> int:
    return sum(_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(result))


def collectives(hlo_text: str) -> list[Collective]:
    out, computation = [], ""
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            computation = m.group(1)
            continue
        m = _OP.match(line)
        if m and "-done" not in m.group(3):
            promoted = "_promoted" in line.split("to_apply=", 1)[-1].split(",", 1)[0] or WIDENED_SCOPE in line
            groups = tuple(map(tuple, replica_groups(line) or ()))
            out.append(Collective(m.group(3), computation, m.group(2), _result_bytes(m.group(2)), promoted, groups))
    return out


_WHILE = re.compile(r"body=%?([\w.\-]+).*\"known_trip_count\":\{\"n\":\"(\d+)\"")


def dots(hlo_text: str) -> list[tuple[tuple[int, ...], str]]:
    """Every matmul of a compiled program that names its source: its result shape on one device and
    its op_name (the named scopes and einsum it came from, e.g. ".../mlp/btd,dcf->btcf/dot_general")."""
    return [(tuple(int(d) for d in dims.split(",") if d), name) for dims, name in _DOT.findall(hlo_text)]


def loop_trip_counts(hlo_text: str) -> dict[str, int]:
    """Body computation name -> known trip count, for every while loop XLA could count."""
    return {m.group(1): int(m.group(2)) for m in map(_WHILE.search, hlo_text.splitlines()) if m}


_CALL = re.compile(
    r"(?:body|condition|calls|true_computation|false_computation|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)


def layer_collectives(hlo_text: str, num_layers: int) -> tuple[list[Collective], list[Collective]]:
    """The program's collectives, and those inside its layer loop (a loop that runs `num_layers` times,
    with every computation its body calls): what crosses devices once per layer."""
    ops = collectives(hlo_text)
    bodies = {name for name, n in loop_trip_counts(hlo_text).items() if n == num_layers}
    layers = reachable(hlo_text, bodies)
    return ops, [c for c in ops if c.computation in layers]


def reachable(hlo_text: str, roots: set[str]) -> set[str]:
    """`roots` and every computation they call, directly or not (loop bodies, branches, fusions)."""
    calls: dict[str, set[str]] = {}
    computation = ""
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            computation = m.group(1)
            continue
        for target in _CALL.findall(line):
            calls.setdefault(computation, set()).update(re.findall(r"%?([\w.\-]+)", target.strip("{}")))
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(calls.get(name, ()))
    return seen


def _iota(dims: list[int], reshape: list[int], perm: list[int] | None) -> np.ndarray:
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    if perm:
        ids = ids.transpose(perm)
    return ids.reshape(dims)


def replica_groups(line: str) -> list[list[int]] | None:
    """The device groups of one HLO collective (source/target pairs for a permute), in any of the
    forms XLA prints; None when the line names none."""
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)+)\}", line)
    if m:
        return [list(map(int, g)) for g in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        dims, shape = [int(x) for x in m.group(1).split(",")], [int(x) for x in m.group(2).split(",")]
        perm = [int(x) for x in m.group(3).split(",")] if m.group(3) else None
        return _iota(dims, shape, perm).reshape(dims[0], -1).tolist()
    m = re.search(
        r"replica_groups=mesh\[([^\]]*)\],? "
        r"(?:device_ids=\(\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?\) )?\{([^}]*)\}",
        line,
    )
    if m:
        names = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        sizes = [int(s) for _, s in names]
        shape = [int(x) for x in m.group(2).split(",")] if m.group(2) else sizes
        reshape = [int(x) for x in m.group(3).split(",")] if m.group(3) else shape
        perm = [int(x) for x in m.group(4).split(",")] if m.group(4) else None
        ids = _iota(shape, reshape, perm).reshape(sizes)
        over = [i for i, (n, _) in enumerate(names) if f"'{n}'" in m.group(5)]
        rest = [i for i in range(len(sizes)) if i not in over]
        return ids.transpose(rest + over).reshape(-1, math.prod(sizes[i] for i in over) or 1).tolist()
    return None


def group_axes(groups: list[list[int]] | None, mesh) -> frozenset:
    """The mesh axes along which the devices of a group differ (device id = place in the mesh's order)."""
    if not groups:
        return frozenset()
    shape, names = mesh.devices.shape, mesh.axis_names
    axes = set()
    for g in groups:
        coords = np.array([np.unravel_index(i, shape) for i in g if i < math.prod(shape)])
        if len(coords):
            axes.update(names[a] for a in range(len(shape)) if len(set(coords[:, a])) > 1)
    return frozenset(axes)
