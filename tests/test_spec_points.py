"""The behaviours of spec §15 ("test points"), each checked against independent arithmetic.

Numbers in comments refer to the test-point list. Format points (31-37) live in test_formats.py and
test_checkpoint.py, cache sizes (38) in test_layout.py, tokenizer points (40) in test_tokenizer_chat.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from v4_plugin.checkpoint.config import LayerType, parse_config, preset_config
from v4_plugin.cache.formats import EXACT
from v4_plugin.runtime.batch import KVCodec
from v4_plugin.runtime.model import SequenceCache, V4Model
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.runtime.ops import attention as attn_ops
from v4_plugin.runtime.ops import compressor as comp_ops
from v4_plugin.runtime.ops import indexer as index_ops
from v4_plugin.runtime.ops import mhc
from v4_plugin.runtime.ops.moe import ExpertWeights, expert, route
from v4_plugin.runtime.ops.rope import Rope, rope_frequencies
from v4_plugin.checkpoint.quant import fake_quant_fp8, hadamard
from v4_plugin.checkpoint.tiny import TINY_PRESETS, random_weights

g = torch.Generator().manual_seed(1234)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).float()


# ---- attention ----------------------------------------------------------------------------------
def test_04_query_has_weightless_per_head_norm():
    cfg = parse_config(TINY_PRESETS["flash"])
    w = random_weights(cfg, seed=3)
    model = V4Model(cfg, w, quant=QuantSim.off())
    x = randn(5, cfg.hidden_size)
    c_q, q = model.blocks[0].query(x, torch.zeros(5, dtype=torch.long))  # position 0: RoPE is the identity
    a = x @ w["layers.0.attn.wq_a.weight"].T
    a = a / a.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w["layers.0.attn.q_norm.weight"]
    torch.testing.assert_close(c_q, a, atol=1e-5, rtol=1e-5)
    b = (a @ w["layers.0.attn.wq_b.weight"].T).view(5, cfg.num_attention_heads, cfg.head_dim)
    torch.testing.assert_close(q, b / b.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt(), atol=1e-5, rtol=1e-5)


def test_05_rope_rotates_interleaved_pairs_of_the_tail_only():
    rope = Rope(8, 10000.0, None)
    x = torch.zeros(1, 12)
    x[0, 4] = 1.0  # first element of the first rotated pair (dims 4, 5)
    x[0, 0] = 3.0  # a non-rope dim
    y = rope.rotate(x, torch.tensor([2]))
    assert y[0, 0] == 3.0 and torch.allclose(y[0, 4:6], torch.tensor([math.cos(2.0), math.sin(2.0)]))
    assert torch.count_nonzero(y[0, 6:]) == 0  # NeoX halves would have moved it to dim 8


def test_06_rope_per_layer_type():
    cfg = preset_config("flash")
    swa, csa = Rope.for_layer(cfg, LayerType.SWA), Rope.for_layer(cfg, LayerType.CSA)
    torch.testing.assert_close(swa.freqs, 10000.0 ** (-torch.arange(0, 64, 2) / 64.0))
    assert torch.equal(csa.freqs, Rope.for_layer(cfg, LayerType.HCA).freqs)
    assert not torch.allclose(csa.freqs, swa.freqs)


def test_07_yarn_ramp():
    cfg = preset_config("flash")
    f = rope_frequencies(64, 160000.0, cfg.rope_scaling).double()
    base = 160000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    for i in range(32):
        gamma = min(max((i - 15) / 10, 0.0), 1.0)
        assert f[i].item() == pytest.approx(base[i].item() * (1 - gamma) + base[i].item() / 16 * gamma, rel=1e-6)


def _attend_naive(q, kv, idx, sink, scale):
    out = torch.zeros(q.shape, dtype=torch.float64)
    for t in range(q.shape[0]):
        for h in range(q.shape[1]):
            num, den = torch.zeros(q.shape[-1], dtype=torch.float64), math.exp(float(sink[h]))
            for j in idx[t].tolist():
                if j >= 0:
                    p = math.exp(float(q[t, h].double() @ kv[j].double()) * scale)
                    num += p * kv[j].double()
                    den += p
            out[t, h] = num / den
    return out.float()


def test_08_10_11_one_softmax_kv_is_key_and_value_sink_in_denominator():
    q, kv, sink = randn(3, 2, 16), randn(6, 16), randn(2)
    idx = torch.tensor([[0, 1, -1, 4], [2, 2, 3, -1], [-1, -1, -1, -1]])  # slot 2 twice: no dedup
    got = attn_ops.sparse_attention(q, kv, idx, sink, 16**-0.5)
    torch.testing.assert_close(got, _attend_naive(q, kv, idx, sink, 16**-0.5), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], torch.zeros(2, 16))  # nothing visible: only the sink, zero output
    padded = attn_ops.sparse_attention(q, kv, idx, torch.full((2,), float("-inf")), 16**-0.5)
    assert torch.equal(padded[2], torch.zeros(2, 16))  # a padded head (sink -inf) with nothing: 0, not NaN


def test_09_output_is_derotated_relative_positions_only():
    """K = V carries RoPE at the key position; rotating the output by -t leaves a function of p - t:
    an SWA layer's attention over the same tokens is unchanged when every position shifts by 1000."""
    cfg = parse_config(TINY_PRESETS["flash"])
    block = V4Model(cfg, random_weights(cfg, seed=5), quant=QuantSim.off()).blocks[0]
    x, local = randn(9, cfg.hidden_size), torch.arange(9)
    indices = attn_ops.window_positions(local, cfg.sliding_window)

    def attend_at(offset: int) -> torch.Tensor:
        positions = local + offset
        _, q = block.query(x, positions)
        return block.attend(q, block.window_kv(x, positions), indices, positions)

    torch.testing.assert_close(attend_at(0), attend_at(1000), atol=2e-3, rtol=2e-3)


def test_12_window_positions_and_cache_rows():
    pos = torch.tensor([0, 5, 200])
    w = attn_ops.window_positions(pos, 128)
    assert w[0].tolist() == [-1] * 127 + [0]
    assert w[1, -6:].tolist() == [0, 1, 2, 3, 4, 5] and (w[1, :-6] == -1).all()
    assert w[2].tolist() == list(range(73, 201))
    cfg = parse_config(TINY_PRESETS["flash"])
    model = V4Model(cfg, random_weights(cfg, seed=1), quant=QuantSim.off())
    block, x = model.blocks[0], randn(130, cfg.hidden_size)
    cache = SequenceCache(cfg, [block.kind], model.dtype, "cpu")
    block.attention(x, cache.plan(130), cache.layers[0], KVCodec(cfg, EXACT, model.dtype))
    kv = block.window_kv(x, torch.arange(130))
    assert torch.equal(cache.layers[0].window.data[0, :130], kv)  # entry p holds position p


@pytest.mark.parametrize("m,cases", [(4, {2: 0, 3: 1, 4: 1, 6: 1, 7: 2, 8: 2}), (128, {126: 0, 127: 1, 128: 1, 255: 2})])
def test_13_visibility_rule(m, cases):
    got = attn_ops.visible_entries(torch.tensor(list(cases)), m)
    assert got.tolist() == list(cases.values())


@pytest.mark.parametrize("layer,first", [(2, 3), (3, 127)])  # tiny flash: layer 2 CSA, layer 3 HCA
def test_13_first_compressed_entry_reaches_the_logits_exactly_at_its_last_token(layer, first):
    cfg = parse_config(TINY_PRESETS["flash"])
    w = random_weights(cfg, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (first + 2,), generator=g)
    base = V4Model(cfg, w, quant=QuantSim.off()).forward(ids).logits
    name = f"layers.{layer}.attn.compressor.wkv.weight"
    bumped = V4Model(cfg, w | {name: w[name] * 1.5}, quant=QuantSim.off()).forward(ids).logits
    assert torch.equal(base[:first], bumped[:first])
    assert not torch.allclose(base[first], bumped[first])


def test_15_output_groups_take_consecutive_heads_and_rows():
    t, h, d, groups, rank = 2, 4, 8, 2, 3
    o, wo_a = randn(t, h, d), randn(groups * rank, h * d // groups)
    got = attn_ops.grouped_output_projection(o, wo_a, groups)
    for gi in range(groups):
        heads = o[:, gi * 2 : gi * 2 + 2].reshape(t, -1)
        torch.testing.assert_close(got[:, gi * rank : (gi + 1) * rank], heads @ wo_a[gi * rank : (gi + 1) * rank].T)


# ---- compressor and indexer -----------------------------------------------------------------------
def test_16_softmax_per_channel_over_tokens():
    m, e = 4, 3
    kv, score = randn(1, m, e), randn(1, m, e)
    got = comp_ops.pool_blocks(kv, score, overlap=False)
    for c in range(e):
        w = torch.softmax(score[0, :, c].double(), 0)
        assert got[0, c].item() == pytest.approx(float((w * kv[0, :, c].double()).sum()), rel=1e-6)


def test_17_overlap_pools_a_halves_of_previous_block_and_b_halves_of_current():
    m, e = 4, 2
    kv, score = randn(2, m, 2 * e), randn(2, m, 2 * e)
    got = comp_ops.pool_blocks(kv, score, overlap=True)
    for c in range(e):
        w0 = torch.softmax(score[0, :, e + c].double(), 0)  # entry 0: only B-halves of block 0
        assert got[0, c].item() == pytest.approx(float((w0 * kv[0, :, e + c].double()).sum()), rel=1e-6)
        cand_s = torch.cat((score[0, :, c], score[1, :, e + c])).double()
        cand_v = torch.cat((kv[0, :, c], kv[1, :, e + c])).double()
        assert got[1, c].item() == pytest.approx(float((torch.softmax(cand_s, 0) * cand_v).sum()), rel=1e-6)


def test_18_entry_post_processing_order_and_block_start_rope():
    e, rd, m = 128, 64, 4
    pooled, weight = randn(3, e), 1 + 0.1 * randn(e)
    rope = Rope(rd, 160000.0, None)
    got = comp_ops.finish_entries(pooled, torch.arange(3), ratio=m, norm_weight=weight, eps=1e-6, rope=rope,
                                  dtype=torch.float32, indexer=False, simulate_quant=True)
    normed = pooled / pooled.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * weight
    rotated = rope.rotate(normed, torch.tensor([0, 4, 8]))  # j*m, the first position of block j
    expected = torch.cat((fake_quant_fp8(rotated[:, :64], 64), rotated[:, 64:].bfloat16().float()), -1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert not torch.equal(got[:, 64:], fake_quant_fp8(got[:, 64:], 64))  # rope dims: bf16, not FP8


def test_19_first_block_has_no_previous_block():
    """Block 0 of the overlapping compressor pools its own B-halves only: the A-slots of the absent
    previous block get gate -inf (weight 0)."""
    kv, score = randn(1, 4, 16), randn(1, 4, 16)
    got = comp_ops.pool_blocks(kv, score, True)
    expected = (kv[..., 8:] * torch.softmax(score[..., 8:], dim=1)).sum(1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_20_index_scores():
    q, w, k = randn(2, 3, 8), randn(2, 3), randn(5, 8)
    got = index_ops.index_scores(q, w, k)
    for t in range(2):
        for j in range(5):
            ref = sum(float(w[t, h]) * max(0.0, float(q[t, h] @ k[j])) for h in range(3))
            assert got[t, j].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_21_hadamard_is_normalized_and_orthogonal():
    x = randn(4, 128)
    assert torch.allclose(hadamard(torch.eye(1, 128)), torch.full((1, 128), 128**-0.5))
    torch.testing.assert_close(hadamard(hadamard(x)), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hadamard(x).norm(dim=-1), x.norm(dim=-1))


def test_22_topk_masks_invisible_and_breaks_ties_by_index():
    scores = torch.tensor([[5.0, 1.0, 1.0, 9.0, 7.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    got = index_ops.select_topk(scores, torch.tensor([3, 5]), k=4)
    assert got[0].tolist() == [0, 1, 2, -1]  # entries 3 and 4 are not visible yet
    assert got[1].tolist() == [0, 1, 2, 3]  # equal scores: the lower index wins
    assert index_ops.select_topk(scores, torch.tensor([3, 5]), k=9).shape == (2, 5)  # k = min(topk, N)


# ---- mHC and MoE -----------------------------------------------------------------------------------
def test_24_25_hc_pre():
    t, hc, d = 2, 4, 6
    x, fn, scale, base = randn(t, hc, d), randn(24, hc * d), randn(3), randn(24)
    u, post, comb = mhc.hc_pre(x, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20)
    flat = x.reshape(t, -1).double()
    mix = (flat / flat.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ fn.double().T
    pre = torch.sigmoid(mix[:, :4] * scale[0] + base[:4]) + 1e-6
    torch.testing.assert_close(u, (pre[:, :, None] * x.double()).sum(1).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(post, (2 * torch.sigmoid(mix[:, 4:8] * scale[1] + base[4:8])).float())
    c = (mix[:, 8:] * scale[2] + base[8:]).view(t, 4, 4).softmax(-1) + 1e-6
    c = c / (c.sum(-2, keepdim=True) + 1e-6)
    for _ in range(19):
        c = c / (c.sum(-1, keepdim=True) + 1e-6)
        c = c / (c.sum(-2, keepdim=True) + 1e-6)
    torch.testing.assert_close(comb, c.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(comb.sum(-2), torch.ones(t, 4), atol=1e-5, rtol=0)  # the last pass is a column pass
    torch.testing.assert_close(comb.sum(-1), torch.ones(t, 4), atol=2e-2, rtol=0)  # rows: approximately


def test_26_hc_post_sums_over_the_source_index():
    x = torch.tensor([[[1.0], [10.0]]])  # streams 0, 1
    comb = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # C[0, 1] = 1: stream 0 feeds stream 1
    out = mhc.hc_post(torch.zeros(1, 1), x, torch.zeros(1, 2), comb)
    assert out.flatten().tolist() == [0.0, 1.0]


def test_27_hc_head():
    x, fn, scale, base = randn(2, 4, 5), randn(4, 20), randn(1), randn(4)
    flat = x.reshape(2, -1)
    pre = torch.sigmoid((flat / flat.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ fn.T * scale + base) + 1e-6
    torch.testing.assert_close(mhc.hc_head(x, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6),
                               (pre[:, :, None] * x).sum(1), atol=1e-5, rtol=1e-5)


def test_28_29_routing():
    x, gate_w = randn(3, 8), randn(6, 8)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 100.0])  # forces expert 5 into every selection
    weights, ids = route(x, gate_w, top_k=2, scaling=1.5, bias=bias)
    scores = torch.nn.functional.softplus(x @ gate_w.T).sqrt()
    for t in range(3):
        assert ids[t, 0] == 5
        chosen = scores[t, ids[t]]
        torch.testing.assert_close(weights[t], chosen / chosen.sum() * 1.5)  # unbiased scores
    tid2eid = torch.tensor([[1, 4], [0, 2], [3, 5]])
    weights, ids = route(x, gate_w, top_k=2, scaling=2.5, tid2eid=tid2eid, token_ids=torch.tensor([2, 0, 0]))
    assert ids.tolist() == [[3, 5], [1, 4], [1, 4]]
    torch.testing.assert_close(weights.sum(-1), torch.full((3,), 2.5))


def test_30_swiglu_clamps():
    x = torch.ones(1, 1)
    w = ExpertWeights(w1=torch.tensor([[20.0], [-20.0]]), w2=torch.ones(1, 2), w3=torch.tensor([[30.0], [-30.0]]))
    y = expert(x, w, limit=10.0, quantize_input=False, weight=torch.tensor([[0.5]]))
    silu = torch.nn.functional.silu
    ref = 0.5 * (silu(torch.tensor(10.0)) * 10.0 + silu(torch.tensor(-20.0)) * -10.0)  # gate capped above only
    assert y.item() == pytest.approx(ref.item(), rel=1e-6)


def test_39_mtp_block_is_swa_with_plain_rope_and_shares_embedding_and_head():
    cfg = parse_config(TINY_PRESETS["flash"])
    w = random_weights(cfg, seed=4)
    model = V4Model(cfg, w, quant=QuantSim.off())
    block = model.mtp_blocks[0]
    assert block.kind is LayerType.SWA and torch.equal(block.rope.freqs, Rope.for_layer(cfg, LayerType.SWA).freqs)
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=g)
    out = model.forward(ids)
    draft = model.mtp_forward(out.streams[:-1], ids[1:])
    assert draft.logits.shape == (11, cfg.vocab_size)
    w2 = dict(w)
    w2["head.weight"] = w["head.weight"].flip(0)  # the shared head: flipping its rows flips the MTP logits
    flipped = V4Model(cfg, w2, quant=QuantSim.off()).mtp_forward(out.streams[:-1], ids[1:])
    torch.testing.assert_close(flipped.logits, draft.logits.flip(-1))
