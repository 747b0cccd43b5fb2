"""Splitting and fusing adapters by output rows (`Adapter.rows`, `fusion.stack_rows`, `reorder_rows`).

The reference for a stack is the members' own changes placed one under the other (zero rows for a
member that is absent), computed in float64 by each member's adapter class; for a split, the rows of
the whole's change. Factors are random N(0, 1), so a wrong block, scale or order shows.
"""

from __future__ import annotations

import pytest
import torch

from loraformats.adapters import DoRA, Exactness, LoHa, LoKr, LoRA
from loraformats.errors import UnsupportedError
from loraformats.families import Layer
from loraformats.fusion import inverse, reorder_rows, stack_rows
from loraformats.tensors import MemoryTensor

IN = 12
WIDTHS = (8, 8, 16)


def tensor(*shape: int, seed: int, dtype=torch.float32) -> MemoryTensor:
    return MemoryTensor.from_torch(
        torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    )


def scalar(value: float) -> MemoryTensor:
    return MemoryTensor.from_torch(torch.tensor(value, dtype=torch.float32))


def layer(rows: int) -> Layer:
    return Layer("linear", IN, rows)


def lora(
    rows: int, rank: int, seed: int, alpha: float | None = None, down: MemoryTensor | None = None
) -> LoRA:
    return LoRA(
        down=down or tensor(rank, IN, seed=seed),
        up=tensor(rows, rank, seed=seed + 1),
        alpha=None if alpha is None else scalar(alpha),
    )


def stacked_change(parts, widths) -> torch.Tensor:
    """The members' changes one under the other, zero rows for absent members (float64)."""
    return torch.cat(
        [
            p.delta(layer(w)) if p is not None else torch.zeros(w, IN, dtype=torch.float64)
            for p, w in zip(parts, widths, strict=True)
        ]
    )


def test_members_sharing_down_and_scale_fuse_at_their_rank_byte_for_byte():
    down = tensor(4, IN, seed=1)
    parts = [lora(w, 4, seed=10 + i, alpha=2.0, down=down) for i, w in enumerate(WIDTHS)]
    fused = stack_rows(parts, [layer(w) for w in WIDTHS])
    assert fused.how == "shared" and fused.exactness is Exactness.IDENTICAL
    assert fused.adapter.rank == 4 and fused.adapter.down is down
    assert fused.adapter.up.read_bytes() == b"".join(p.up.read_bytes() for p in parts)
    torch.testing.assert_close(fused.adapter.delta(layer(sum(WIDTHS))), stacked_change(parts, WIDTHS))


@pytest.mark.parametrize(
    "alphas", [(2.0, 2.0, 2.0), (2.0, 3.0, None)], ids=["equal-scales", "unequal-scales"]
)
def test_members_with_their_own_downs_fuse_block_diagonally(alphas):
    parts = [
        lora(w, 2 + i, seed=20 + 3 * i, alpha=a) for i, (w, a) in enumerate(zip(WIDTHS, alphas, strict=True))
    ]
    fused = stack_rows(parts, [layer(w) for w in WIDTHS])
    assert fused.how == "block-diagonal" and fused.adapter.rank == 2 + 3 + 4
    expected = Exactness.ROUNDED if len({p.scale for p in parts}) > 1 else Exactness.EXACT
    assert fused.exactness in (expected, Exactness.ROUNDED)
    torch.testing.assert_close(
        fused.adapter.delta(layer(sum(WIDTHS))), stacked_change(parts, WIDTHS), rtol=1e-6, atol=1e-6
    )


def test_absent_members_are_zero_rows():
    down = tensor(3, IN, seed=2)
    parts = [lora(8, 3, seed=30, down=down), None, lora(16, 3, seed=31, down=down)]
    fused = stack_rows(parts, [layer(w) for w in WIDTHS])
    assert fused.how == "shared" and fused.adapter.rank == 3
    change = fused.adapter.delta(layer(sum(WIDTHS)))
    assert torch.count_nonzero(change[8:16]) == 0
    torch.testing.assert_close(change, stacked_change(parts, WIDTHS))


def test_split_then_stack_gives_back_the_same_bytes():
    whole = lora(sum(WIDTHS), 4, seed=40, alpha=8.0)
    bounds, start = [], 0
    for width in WIDTHS:
        bounds.append((start, start + width))
        start += width
    parts = [whole.rows(a, b) for a, b in bounds]
    for part, (a, b) in zip(parts, bounds, strict=True):
        torch.testing.assert_close(part.delta(layer(b - a)), whole.delta(layer(sum(WIDTHS)))[a:b])
    fused = stack_rows(parts, [layer(w) for w in WIDTHS]).adapter
    assert fused.up.read_bytes() == whole.up.read_bytes() and fused.down is whole.down


def test_row_reorder_is_undone_by_its_inverse():
    whole = lora(16, 4, seed=50, alpha=4.0)
    order = ((8, 16), (0, 8))  # BFL's shift/scale halves
    swapped = reorder_rows(whole, order, layer(16))
    change = whole.delta(layer(16))
    torch.testing.assert_close(swapped.delta(layer(16)), torch.cat([change[8:], change[:8]]))
    back = reorder_rows(swapped, inverse(order), layer(16))
    assert back.up.read_bytes() == whole.up.read_bytes()


def magnitude(count: int, seed: int) -> MemoryTensor:
    return MemoryTensor.from_torch(torch.rand(count, generator=torch.Generator().manual_seed(seed)) + 0.5)


def test_output_axis_dora_splits_and_fuses_row_for_row():
    down = tensor(4, IN, seed=3)
    parts = [
        DoRA(lora(w, 4, seed=60 + i, down=down), magnitude(w, 70 + i), "output") for i, w in enumerate(WIDTHS)
    ]
    fused = stack_rows(parts, [layer(w) for w in WIDTHS]).adapter
    base = torch.randn(sum(WIDTHS), IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    rows = torch.cat(
        [p.apply(base[a : a + w], layer(w)) for p, w, a in zip(parts, WIDTHS, (0, 8, 16), strict=True)]
    )
    torch.testing.assert_close(fused.apply(base, layer(sum(WIDTHS))), rows)


def test_dora_groups_that_cannot_be_fused_are_refused():
    down = tensor(4, IN, seed=4)
    doras = [
        DoRA(lora(w, 4, seed=80 + i, down=down), magnitude(w, 90 + i), "output") for i, w in enumerate(WIDTHS)
    ]
    layers = [layer(w) for w in WIDTHS]
    with pytest.raises(UnsupportedError, match="misses members"):
        stack_rows([doras[0], None, doras[2]], layers)
    with pytest.raises(UnsupportedError, match="mixes DoRA and plain"):
        stack_rows([doras[0], lora(8, 4, seed=99, down=down), doras[2]], layers)
    column_wise = DoRA(lora(32, 4, seed=98), magnitude(IN, 97), "input")
    with pytest.raises(UnsupportedError, match="input-axis"):
        column_wise.rows(0, 8)


def test_input_axis_dora_survives_a_row_reorder():
    adapter = DoRA(lora(16, 4, seed=100), magnitude(IN, 101), "input")
    swapped = reorder_rows(adapter, ((8, 16), (0, 8)), layer(16))
    base = torch.randn(16, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    permuted_base = torch.cat([base[8:], base[:8]])
    expected = adapter.apply(base, layer(16))
    torch.testing.assert_close(
        swapped.apply(permuted_base, layer(16)), torch.cat([expected[8:], expected[:8]])
    )


def test_loha_rows_come_from_its_output_factors():
    loha = LoHa(
        hada_w1_a=tensor(16, 2, seed=110),
        hada_w1_b=tensor(2, IN, seed=111),
        hada_w2_a=tensor(16, 2, seed=112),
        hada_w2_b=tensor(2, IN, seed=113),
        alpha=scalar(1.0),
    )
    torch.testing.assert_close(loha.rows(4, 12).delta(layer(8)), loha.delta(layer(16))[4:12])


def test_lokr_rows_split_only_along_its_kronecker_blocks():
    lokr = LoKr(lokr_w1=tensor(4, 3, seed=120), lokr_w2=tensor(4, 4, seed=121))  # kron: 16 x 12
    torch.testing.assert_close(lokr.rows(4, 12).delta(layer(8)), lokr.delta(layer(16))[4:12])
    with pytest.raises(UnsupportedError, match="Kronecker blocks"):
        lokr.rows(0, 6)
