"""Byte formats of the cache records (spec §5.2, §5.3), checked byte by byte."""

from __future__ import annotations

import pytest
import torch

from v4_plugin.checkpoint.config import preset_config
from v4_plugin.cache.records import pack_indexer, pack_main, unpack_indexer, unpack_main
from v4_plugin.cache.layout import IndexerCache
from v4_plugin.runtime.ops.compressor import simulate_kv_storage
from v4_plugin.checkpoint.quant import fake_quant_fp4, hadamard

CFG = preset_config("flash")  # head_dim 512 = 448 FP8 + 64 bf16 rope; index_head_dim 128


def test_main_record_bytes():
    kv = torch.ones(1, 512)
    kv[0, 64] = -3.0  # second FP8 block: amax 3 -> scale 2^ceil(log2(3/448)) = 2^-7
    kv[0, 448] = 2.0
    rec = pack_main(kv, CFG)[0]
    assert rec.shape == (584,)
    # block 0: scale 2^-8 (1/448 rounded up), so 1.0 is stored as 256 = e4m3 0x78 (exponent 15, mantissa 0)
    assert rec[0] == 0x78 and rec[63] == 0x78
    # block 1: -3 / 2^-7 = -384 = -(1.5 * 2^8): sign bit, exponent 15, mantissa 0b100 -> 0xFC
    assert rec[64] == 0xFC and rec[65] == 0x70  # 1.0 / 2^-7 = 128 = 2^7: exponent 14 -> 0x70
    assert rec[448:452].tolist() == [0x00, 0x40, 0x80, 0x3F]  # bf16 2.0 then 1.0, little endian
    assert rec[576:583].tolist() == [127 - 8, 127 - 7] + [127 - 8] * 5  # E8M0 scale bytes
    assert rec[583] == 0  # pad


def test_main_round_trip_is_exact_on_simulated_values():
    kv = simulate_kv_storage(torch.randn(33, 512) * torch.logspace(-3, 3, 512), 64)
    assert torch.equal(unpack_main(pack_main(kv, CFG), CFG), kv)


@pytest.mark.parametrize("fmt,size", [(IndexerCache.FP8, 132), (IndexerCache.FP4, 68)])
def test_indexer_records(fmt, size):
    keys = fake_quant_fp4(hadamard(torch.randn(9, 128)), 32)
    rec = pack_indexer(keys, CFG, fmt)
    assert rec.shape == (9, size)
    assert torch.equal(unpack_indexer(rec, CFG, fmt), keys)


def test_fp4_indexer_record_layout():
    keys = torch.zeros(1, 128)
    keys[0, 0], keys[0, 1] = 6.0, -0.5  # amax 6 -> scale 2^0: codes 7 and 9 (sign bit 3 + code 1)
    rec = pack_indexer(keys, CFG, IndexerCache.FP4)[0]
    assert rec[0] == 0x97  # low nibble = even dim
    assert rec[64:68].tolist() == [127, 127 - 126, 127 - 126, 127 - 126]  # all-zero blocks: amax floor 6*2^-126
