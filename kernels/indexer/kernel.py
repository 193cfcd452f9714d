"""Lightning-indexer scores over cached keys, and an exact top-k (spec §4.6, §5.3).

References:
* `index_scores` mirrors `v4_plugin.runtime.ops.indexer.index_scores` (keys read from the cache through
  `v4_plugin.cache.records.unpack_indexer`); it additionally masks invisible entries to -inf;
* `select_topk` mirrors `v4_plugin.runtime.ops.indexer.select_topk` exactly, output order included;
* `index_topk` is the two chained (scores are written once, fp32, then selected).

Scores: I[t, j] = sum_h w[t, h] * relu(q[t, h] . k_j), fp32 accumulation, with keys read from
FP8 records (132 B for V4: e4m3 + one fp32 scale), MXFP4 records (68 B: packed e2m1, low nibble =
even dim, + one E8M0 scale per 32) or an unquantized float cache (exact mode), dequantized in
registers. Entry j of query t is the key in slot `slots[row, j]`, where the row is t itself
(slots [T, N]), t's sequence (slots [B, N] + query_start [B+1]: queries of a sequence share the
key tiles, decode and prefill chunks alike), or, without slots, key row j. Entry j is visible to
t iff j < visible[t] and its slot is >= 0; invisible entries score -inf, and tiles with nothing
visible are not computed.

Top-k, ties and order. Each score becomes one int64 key, (order-preserving int32 image of the
fp32 score) * 2^32 + (2^31 - 1 - j): larger key = larger score, and among equal scores the lower
entry index. -0.0 is folded to +0.0 and every NaN to one positive NaN (torch sorts NaN first and
treats +-0 as equal); invisible entries (j >= visible[t]) get the smallest int64, below every
real key. The keys are distinct, so the k largest form one well-defined set, sorted descending
by a bitonic top-k (the network of `tl.topk`). That is exactly a stable descending sort, i.e.
`select_topk`: same picks, same order, -1 for picks past the visible entries (they come last, as in the reference).
Long rows run in passes: each program keeps the top K_PAD of a chunk of CHUNK keys, the survivors
(n / CHUNK * K_PAD) are reduced again, until one chunk remains; since keys are distinct the
result is independent of the chunking.

GPU status: all score configs and the top-k passes compile for sm90 and sm80 (triton.compile with
a GPUTarget, no spills); not yet run on a GPU. Benchmark: bench/bench_indexer.py.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from v4_kernels.formats import e2m1_value, e4m3_to_f32, e8m0_value
from v4_plugin.checkpoint.config import FP4_BLOCK

__all__ = ["index_scores", "select_topk", "index_topk", "indexer_record_format", "scores_tiles", "topk_tiles"]

KEY_FLOAT, KEY_FP8, KEY_FP4 = 0, 1, 2
_SENTINEL: tl.constexpr = tl.constexpr(-(2**63))  # below every real key


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def indexer_record_format(record_bytes: int, index_head_dim: int) -> int:
    """KEY_FP8 (di + 4 bytes) or KEY_FP4 (di/2 + di/32 bytes), from the record width."""
    if record_bytes == index_head_dim + 4:
        return KEY_FP8
    if record_bytes == index_head_dim // 2 + index_head_dim // FP4_BLOCK:
        return KEY_FP4
    raise ValueError(f"{record_bytes}-B records match neither FP8 nor FP4 indexer keys of {index_head_dim} dims")


# ---- dequantization (fp32 out) -----------------------------------------------------------------
@triton.jit
def _load_keys(keys_ptr, slot, valid, stride_keys, DI: tl.constexpr, KEY_FMT: tl.constexpr, FP8_HW: tl.constexpr,
               ROW_ALIGN: tl.constexpr):
    """Keys of `slot` [BN] as fp32 [BN, DI]; invalid rows are 0. ROW_ALIGN: see `_row_align`."""
    row_off = tl.multiple_of(slot.to(tl.int64) * stride_keys, ROW_ALIGN)
    rec = keys_ptr + row_off[:, None]
    row_ok = valid[:, None]
    if KEY_FMT == 1:
        d = tl.arange(0, DI)[None, :]
        v = e4m3_to_f32(tl.load(rec + d, mask=row_ok, other=0), FP8_HW)
        scale = tl.load((keys_ptr + row_off + DI).to(tl.pointer_type(tl.float32)),
                        mask=valid, other=0.0)
        k = v * scale[:, None]
    elif KEY_FMT == 2:
        i = tl.arange(0, DI // 2)[None, :]  # byte i holds dims 2i (low nibble) and 2i + 1 (high)
        byte = tl.load(rec + i, mask=row_ok, other=0).to(tl.int32)
        scale = e8m0_value(tl.load(rec + DI // 2 + i // 16, mask=row_ok, other=127).to(tl.int32))
        lo = e2m1_value(byte & 0xF) * scale
        hi = e2m1_value((byte >> 4) & 0xF) * scale
        k = tl.interleave(lo, hi)
    else:
        d = tl.arange(0, DI)[None, :]
        k = tl.load(rec + d, mask=row_ok, other=0.0).to(tl.float32)
    return k


# ---- scores ------------------------------------------------------------------------------------
@triton.jit
def _index_scores_kernel(
    q_ptr, w_ptr, keys_ptr, slots_ptr, visible_ptr, qstart_ptr, out_ptr,
    N, H, stride_qt, stride_qh, stride_wt, stride_keys, stride_sb, stride_ot, N_BUCKET,
    DI: tl.constexpr, HP: tl.constexpr, KEY_FMT: tl.constexpr, HAS_SLOTS: tl.constexpr,
    FP8_HW: tl.constexpr, DOT_F32: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    t0 = tl.load(qstart_ptr + b) + tl.program_id(1) * BLOCK_T
    t_hi = tl.load(qstart_ptr + b + 1)
    if t0 < t_hi:
        trow = t0 + tl.arange(0, BLOCK_T)
        tmask = trow < t_hi
        vis = tl.load(visible_ptr + trow, mask=tmask, other=0)
        j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        jmask = j < N
        o_ptrs = out_ptr + trow.to(tl.int64)[:, None] * stride_ot + j[None, :]
        o_mask = tmask[:, None] & jmask[None, :]
        if tl.program_id(2) * BLOCK_N >= tl.max(vis, 0):
            tl.store(o_ptrs, tl.full([BLOCK_T, BLOCK_N], float("-inf"), tl.float32), mask=o_mask)
        else:
            if HAS_SLOTS:
                slot = tl.load(slots_ptr + b.to(tl.int64) * stride_sb + j, mask=jmask, other=-1)
            else:
                slot = j
            kvalid = jmask & (slot >= 0)
            k = _load_keys(keys_ptr, slot, kvalid, stride_keys, DI, KEY_FMT, FP8_HW, ROW_ALIGN)

            r = tl.arange(0, BLOCK_T * HP)  # one row per (query, head)
            rt = t0 + r // HP
            rh = r % HP
            rmask = (rt < t_hi) & (rh < H)
            d = tl.arange(0, DI)
            q = tl.load(q_ptr + rt.to(tl.int64)[:, None] * stride_qt + rh[:, None] * stride_qh + d[None, :],
                        mask=rmask[:, None], other=0.0)
            w = tl.load(w_ptr + rt.to(tl.int64) * stride_wt + rh, mask=rmask, other=0.0).to(tl.float32)
            if DOT_F32:
                dots = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
            else:
                dots = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="tf32")  # 16-bit: no effect
            part = tl.maximum(dots, 0.0) * w[:, None]  # [BLOCK_T * HP, BLOCK_N]
            score = tl.sum(tl.reshape(part, [BLOCK_T, HP, BLOCK_N]), 1)
            ok = kvalid[None, :] & (j[None, :] < vis[:, None])
            tl.store(o_ptrs, tl.where(ok, score, float("-inf")), mask=o_mask)


def _score_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in ((32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 3), (128, 4, 2), (32, 4, 2))]


@functools.lru_cache(maxsize=None)
def _tuned_scores():
    """Tuned per heads, key format, query tile and key-count bucket (N_BUCKET: a 4K and a 128K context differ)."""
    key = ["H", "DI", "KEY_FMT", "BLOCK_T", "DOT_F32", "N_BUCKET"]
    return triton.autotune(_score_configs(), key=key)(_index_scores_kernel)


def _row_align(stride: int) -> int:
    """Largest power of two (<= 16) dividing the key-row stride (4 for 132 / 68-B records): a
    `tl.multiple_of` hint, since such strides are not specialized and the gathers would go bytewise."""
    return min(16, stride & -stride) if stride > 0 else 1


def scores_tiles(max_queries: int, heads: int, n: int, on_gpu: bool) -> dict:
    """Tiles of the score kernel: BLOCK_T queries x pow2(heads) rows (>= 16 for tl.dot), BLOCK_N keys."""
    hp = triton.next_power_of_2(heads)
    rows_cap = 128 if on_gpu else 256
    block_t = max(triton.cdiv(16, hp), min(triton.next_power_of_2(max(1, max_queries)), max(1, rows_cap // hp)))
    block_n = None if on_gpu else max(16, min(256, triton.next_power_of_2(max(1, n))))
    return dict(HP=hp, BLOCK_T=block_t, BLOCK_N=block_n)


def index_scores(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor, *,
                 slots: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                 query_start: torch.Tensor | None = None, max_queries: int | None = None,
                 fp8_hw: bool | None = None) -> torch.Tensor:
    """Triton `v4_plugin.runtime.ops.indexer.index_scores` over cached keys; fp32 [T, N], invisible = -inf.

    q [T, Hi, di]; head_weights [T, Hi] (already scaled); keys: uint8 records [num_slots, 132 | 68]
    (FP8 | FP4, from the width) or float [num_slots, di]. slots: None (entry j = key row j), [T, N]
    (per query) or [B, N] with query_start int [B+1] (per sequence; queries t in
    query_start[b] ... query_start[b+1] - 1 share row b; pass max_queries, the largest count, to
    avoid a device sync). visible: int [T] (entries j >= visible[t] are invisible); None = all.
    """
    T, H, di = q.shape
    dev = q.device
    if slots is None:
        n = keys.shape[0]
        if query_start is not None:
            raise ValueError("query_start needs per-sequence slots")
        query_start = torch.tensor([0, T], dtype=torch.int32, device=dev)
        max_queries = T
    else:
        n = slots.shape[1]
        if query_start is None:
            if slots.shape[0] != T:
                raise ValueError(f"per-query slots must have {T} rows, got {slots.shape[0]} (or pass query_start)")
            query_start = torch.arange(T + 1, dtype=torch.int32, device=dev)
            max_queries = 1
        elif max_queries is None:
            max_queries = int((query_start[1:] - query_start[:-1]).max().item()) if query_start.numel() > 1 else 0
        slots = slots if slots.stride(-1) == 1 else slots.contiguous()
    out = torch.empty((T, n), dtype=torch.float32, device=dev)
    if T == 0 or n == 0:
        return out
    if visible is None:
        visible = torch.full((T,), n, dtype=torch.int32, device=dev)
    if keys.dtype == torch.uint8:
        fmt = indexer_record_format(keys.shape[1], di)
    else:
        fmt = KEY_FLOAT
        if keys.shape[1] != di:
            raise ValueError(f"keys must be {di} wide, got {keys.shape[1]}")
    if di & (di - 1) or di < 32:
        raise ValueError(f"index_head_dim must be a power of two >= 32, got {di}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    head_weights = head_weights if head_weights.stride(-1) == 1 else head_weights.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    visible = visible.contiguous()
    on_gpu = dev.type == "cuda" and not _interpreting()
    dot_f32 = (not on_gpu) or q.dtype == torch.float32
    if fp8_hw is None:
        fp8_hw = on_gpu and torch.cuda.get_device_capability(dev) >= (8, 9)
    tiles = scores_tiles(max_queries, H, n, on_gpu)
    nb = query_start.numel() - 1
    args = (q, head_weights, keys, slots if slots is not None else keys, visible, query_start, out,
            n, H, q.stride(0), q.stride(1), head_weights.stride(0), keys.stride(0),
            slots.stride(0) if slots is not None else 0, out.stride(0), min(triton.next_power_of_2(n), 1 << 20))
    consts = dict(DI=di, HP=tiles["HP"], KEY_FMT=fmt, HAS_SLOTS=slots is not None, FP8_HW=bool(fp8_hw),
                  DOT_F32=dot_f32, ROW_ALIGN=_row_align(keys.stride(0)), BLOCK_T=tiles["BLOCK_T"])
    t_blocks = max(1, triton.cdiv(max_queries, tiles["BLOCK_T"]))
    if on_gpu:
        grid = lambda meta: (nb, t_blocks, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _tuned_scores()[grid](*args, **consts)
    else:
        _index_scores_kernel[(nb, t_blocks, triton.cdiv(n, tiles["BLOCK_N"]))](
            *args, **consts, BLOCK_N=tiles["BLOCK_N"], num_warps=4, num_stages=1)
    return out


# ---- top-k -------------------------------------------------------------------------------------
@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_and_swap(h, flip, i: tl.constexpr, n_dims: tl.constexpr):
    """Compare-and-swap along the i-th innermost axis of the hypercube h ([2] * n_dims).

    Same network as `tl.sort`, but the pair is resolved with the builtin min / max reductions
    instead of an xor-sum: identical result, and the interpreter runs it vectorized (its generic
    reduce, which `tl.sort` / `tl.topk` hit, runs element by element: ~20x slower).
    """
    lo = tl.min(h, axis=n_dims - 1 - i, keep_dims=True)
    hi = tl.max(h, axis=n_dims - 1 - i, keep_dims=True)
    return tl.where((flip ^ _indicator(n_dims, i)) != 0, hi, lo)


@triton.jit
def _bitonic_merge(h, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    """order 0 ascending, 1 descending, 2 alternating with period 2^stage."""
    if order == 2:
        flip = _indicator(n_dims, stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_and_swap(h, flip, stage - 1 - i, n_dims)
    return h


@triton.jit
def _topk_desc(x, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
    """The 2^LOG_K largest of x [2^LOG_N], sorted descending (bitonic top-k, as `tl.topk`; LOG_K >= 1)."""
    h = tl.reshape(x, [2] * LOG_N)
    for i in tl.static_range(1, LOG_K + 1):  # sort runs of 2^LOG_K, alternating direction
        h = _bitonic_merge(h, i, 2 if i < LOG_N else 1, LOG_N)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):  # max of paired runs is bitonic; re-merge
        h = tl.max(h, axis=LOG_N - i)  # h has LOG_N - i + LOG_K + 1 dims before, one less after
        h = _bitonic_merge(h, LOG_K, 2 if i < LOG_N else 1, LOG_N - i + LOG_K)
    return tl.reshape(h, [2**LOG_K])


@triton.jit
def _topk_pass_kernel(
    src_ptr, visible_ptr, dst_ptr, n_src, stride_src, stride_dst, k_out,
    FROM_SCORES: tl.constexpr, FINAL: tl.constexpr, CHUNK: tl.constexpr, K_PAD: tl.constexpr,
    LOG_CHUNK: tl.constexpr, LOG_K: tl.constexpr,
):
    """Top K_PAD keys of chunk c of row t: candidate keys (int64) or, FINAL, the picked indices."""
    t = tl.program_id(0)
    c = tl.program_id(1)
    i = c * CHUNK + tl.arange(0, CHUNK)
    row = src_ptr + t.to(tl.int64) * stride_src
    if FROM_SCORES:
        vis = tl.load(visible_ptr + t).to(tl.int32)
        ok = (i < n_src) & (i < vis)
        sc = tl.load(row + i, mask=ok, other=0.0)
        sc = tl.where(sc == 0.0, 0.0, sc)  # -0.0 == +0.0 for torch.sort
        sc = tl.where(sc != sc, float("nan"), sc)  # one NaN, sorted first like torch
        bits = sc.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
        key = (ordered.to(tl.int64) << 32) + (2147483647 - i).to(tl.int64)
        key = tl.where(ok, key, tl.full([CHUNK], _SENTINEL, tl.int64))
    else:
        key = tl.load(row + i, mask=i < n_src, other=_SENTINEL)
    top = _topk_desc(key, LOG_CHUNK, LOG_K)
    r = tl.arange(0, K_PAD)
    if FINAL:
        low = top - ((top >> 32) << 32)
        idx = tl.where(top == _SENTINEL, -1, 2147483647 - low)
        tl.store(dst_ptr + t.to(tl.int64) * stride_dst + r, idx, mask=r < k_out)
    else:
        tl.store(dst_ptr + t.to(tl.int64) * stride_dst + c * K_PAD + r, top)


def topk_tiles(n: int, k_pad: int, on_gpu: bool, chunk: int | None = None) -> tuple[int, int]:
    """(CHUNK, num_warps) of a top-k pass over n keys.

    GPU: CHUNK is fixed (4096, or 4 * K_PAD if larger) whatever n is, so a given k compiles four
    variants once (the unrolled network of 4096 keys / k = 1024 takes ~15 s (sm90) to ~2 min
    (sm80) to compile on a slow host; 8192 would double that). CPU (interpreter): one pass of
    pow2(n) when n <= 4096, smaller is faster there.
    """
    if chunk is None:
        base = max(4096, 4 * k_pad)
        chunk = base if on_gpu or n > base else max(k_pad, triton.next_power_of_2(max(1, n)))
    if chunk & (chunk - 1) or chunk < k_pad or (n > chunk and chunk < 2 * k_pad):
        raise ValueError(f"chunk {chunk} must be a power of two >= k_pad ({k_pad}), and >= 2 k_pad for multi-pass")
    return chunk, max(4, min(16, chunk // 512))


def select_topk(scores: torch.Tensor, visible: torch.Tensor, k: int, *, chunk: int | None = None) -> torch.Tensor:
    """Triton `v4_plugin.runtime.ops.indexer.select_topk`: int64 [T, min(k, N)], identical output.

    scores fp32 [T, N]; visible int [T] (entries j < visible[t]). chunk forces the pass size (tests).
    """
    T, n = scores.shape
    k_out = min(k, n)
    out = torch.empty((T, k_out), dtype=torch.int64, device=scores.device)
    if T == 0 or k_out <= 0:
        return out
    on_gpu = scores.device.type == "cuda" and not _interpreting()
    k_pad = max(2, triton.next_power_of_2(k_out))
    src, src_n, from_scores = scores.float().contiguous(), n, True
    visible = visible.contiguous()
    while True:
        ch, warps = topk_tiles(src_n, k_pad, on_gpu, chunk)
        n_chunks = triton.cdiv(src_n, ch)
        final = n_chunks == 1
        dst = out if final else torch.empty((T, n_chunks * k_pad), dtype=torch.int64, device=scores.device)
        _topk_pass_kernel[(T, n_chunks)](src, visible, dst, src_n, src.stride(0), dst.stride(0), k_out,
                                         FROM_SCORES=from_scores, FINAL=final, CHUNK=ch, K_PAD=k_pad,
                                         LOG_CHUNK=ch.bit_length() - 1, LOG_K=k_pad.bit_length() - 1,
                                         num_warps=warps)
        if final:
            return out
        src, src_n, from_scores = dst, n_chunks * k_pad, False


def index_topk(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, k: int, *,
               slots: torch.Tensor | None = None, query_start: torch.Tensor | None = None,
               max_queries: int | None = None) -> torch.Tensor:
    """`select_topk(index_scores(...), visible, k)`: the indexer's picks, int64 [T, min(k, N)], -1 = none."""
    scores = index_scores(q, head_weights, keys, slots=slots, visible=visible, query_start=query_start,
                          max_queries=max_queries)
    return select_topk(scores, visible, k)
