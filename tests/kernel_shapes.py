"""Shapes the Pallas kernels run at: the interpret-mode tests' shapes and real model shapes. Plain data,
so both the kernel tests (jax 0.10.2 and 0.11.2) and the sm_90 compile gate read the same table."""

# Paged decode attention: (batch, q heads, kv heads, head_dim, page_size, pages_per_seq).
ATTENTION_TEST = [
    (3, 8, 2, 32, 4, 5),
    (2, 4, 4, 16, 8, 3),
    (4, 6, 1, 16, 2, 7),
    (1, 9, 3, 64, 16, 2),
    (2, 8, 2, 16, 1, 70),
    (3, 4, 2, 32, 3, 30),
    (2, 8, 8, 64, 64, 3),
]

# Llama-3-8B (32 q heads) and Llama-3-70B (64) decode: 8 kv heads, head_dim 128, bf16.
ATTENTION_REAL = [
    (name, heads, layers, page, batch, context)
    for name, heads, layers in (("llama3-8b", 32, 32), ("llama3-70b", 64, 80))
    for page in (16, 32)
    for batch, context in ((1, 1024), (1, 32768), (16, 8192), (64, 1024), (64, 32768))
]

# Quantized KV pools (int8 or float8_e4m3fn values, float32 scales per token and kv head): three of the
# test shapes (GQA, a group of 3 with head_dim 64, one-token pages), and Llama-3-8B decode in bf16:
# (name, heads, layers, page, batch, context).
KV_QUANT_DTYPES = ("int8", "float8_e4m3fn")
ATTENTION_QUANT_TEST = [ATTENTION_TEST[0], ATTENTION_TEST[3], ATTENTION_TEST[4]]
ATTENTION_QUANT_REAL = [("llama3-8b", 32, 32, 16, 1, 32768), ("llama3-8b", 32, 32, 16, 64, 8192)]

# One sp rank's share of paged attention (sequence parallelism: pages dealt round robin over `ranks`):
# two test shapes and Llama-3-8B decode, bf16: (name, heads, kv heads, head_dim, page, batch, context, ranks).
ATTENTION_PARTIAL = [
    ("test", 8, 2, 32, 4, 3, 80, 2),
    ("test", 9, 3, 64, 16, 1, 256, 4),
    ("llama3-8b", 32, 8, 128, 16, 1, 32768, 4),
    ("llama3-8b", 32, 8, 128, 16, 64, 8192, 2),
]

# Grouped matmul: (id, rows M, K, N, group sizes, (block_m, block_n, block_k) or None for the defaults).
DECODE_SIZES = [0] * 128  # 128 experts, 9 of them hit by a few decode rows, the rest empty
for _expert, _rows in zip((3, 4, 17, 40, 41, 77, 90, 126, 127), (2, 1, 4, 3, 1, 2, 5, 1, 3)):
    DECODE_SIZES[_expert] = _rows
GROUPED_TEST = [
    ("empty-groups", 100, 40, 70, [10, 0, 37, 0, 30], (16, 32, 16)),  # 23 rows past the sum, ragged dims
    ("one-group", 64, 32, 48, [0, 64, 0], (16, 16, 16)),
    ("tiny-groups", 50, 24, 33, [0, 3, 1, 40, 6, 0], (16, 16, 32)),  # tiny groups sharing a tile, sum == M
    ("default-blocks", 37, 24, 200, [20, 17], None),  # two column tiles
    ("all-empty", 20, 16, 16, [0, 0, 0], (16, 16, 16)),
    ("mid-tile-bounds", 64, 32, 32, [5, 20, 13, 26], (16, 16, 16)),  # groups spanning 2-3 tiles
    ("16-groups-one-tile", 64, 16, 32, [3] * 16, (64, 32, 16)),  # 16 rows past the sum
    ("last-group", 40, 16, 32, [0, 0, 0, 40], (16, 16, 16)),
    ("ragged-m", 45, 32, 16, [7, 30, 2], (32, 16, 32)),  # M not a multiple of block_m
    ("decode-128-groups", 24, 32, 32, DECODE_SIZES, None),  # mostly empty, default (small) block_m
]

# Mixtral-8x7B and Qwen3-30B-A3B expert matmuls, bf16: (name, tokens x top-k rows, K, N, experts).
GROUPED_REAL = [
    (f"{model} {phase} {proj}", tokens * top_k, k, n, experts)
    for model, d, f, experts, top_k in (("mixtral-8x7b", 4096, 14336, 8, 2), ("qwen3-30b-a3b", 2048, 768, 128, 8))
    for phase, tokens in (("prefill 8k", 8192), ("decode 64", 64))
    for proj, k, n in (("gate_up", d, 2 * f), ("down", f, d))
]

# Weight-only fp8 matmul (pallas_kernels/fp8_matmul.py): (id, rows M, K, N, block_n, block_k, splits or None).
FP8_TEST = [
    ("one-row", 1, 256, 384, 64, 64, None),  # K split 4 ways
    ("ragged", 3, 200, 100, 32, 64, 2),  # M, K and N that do not divide their blocks, a short last split
    ("sixteen", 16, 128, 64, 64, 32, 1),
    ("rows-64", 64, 96, 48, 16, 32, None),
    ("uneven-splits", 5, 320, 32, 16, 32, 3),  # 10 K tiles over 3 splits of 4: the last has 2
]
# Llama-3-8B's projections at decode rows, bf16 activations: (name, rows, K, N).
FP8_REAL = [
    (f"llama3-8b {proj}", m, k, n)
    for proj, k, n in (("qkv", 4096, 6144), ("gate_up", 4096, 28672), ("down", 14336, 4096), ("o", 4096, 4096))
    for m in (1, 16, 64)
]
