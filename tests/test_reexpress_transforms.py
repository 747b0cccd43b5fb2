"""The exact re-expressions and the planner's choice of edges (no files: adapters in memory)."""

from __future__ import annotations

import pytest
import torch

from loraformats.adapters import IA3, DoRA, Full, LoHa, LoKr, LoRA, Norm
from loraformats.errors import UnsupportedError
from loraformats.families import Layer
from loraformats.planning import best_route
from loraformats.plugins import registry
from loraformats.tensors import MemoryTensor
from loraformats.transforms import BakeLokrScale, FullToLora, LohaToLora, LokrToLora
from test_lycoris_files import build, lycoris_plugin, quiet_lycoris  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

LINEAR = Layer("linear", 12, 10)
CONV = Layer("conv2d", 6, 8, (3, 3))
FP32 = 1e-6


def tensor(*shape: int, dtype=torch.float32, seed=[0]) -> MemoryTensor:  # noqa: B006 (a counter)
    seed[0] += 1
    values = torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))
    return MemoryTensor.from_torch(values.to(dtype))


def scalar(value: float) -> MemoryTensor:
    return MemoryTensor.from_torch(torch.tensor(value))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm()) / max(float(a.norm()), 1e-300)


def capabilities(name: str) -> frozenset[str]:
    return registry.formats()[name].capabilities


def edges() -> list:
    return list(registry.transforms().values())


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_loha_to_lora_is_exact_below_and_above_the_rank_cap(rank):
    """r² below min(O, I): rank r² face-split/Khatri–Rao factors; at or above: (I, ΔW) or (ΔW, I)."""
    loha = LoHa(tensor(10, rank), tensor(rank, 12), tensor(10, rank), tensor(rank, 12), alpha=scalar(0.7))
    lora = LohaToLora().apply(loha, LINEAR)
    lora.check(LINEAR, "lora")
    assert lora.rank == (rank * rank if rank * rank < 10 else 10)
    assert lora.alpha is None and lora.up.dtype == lora.down.dtype == "F32"
    assert relative(loha.delta(LINEAR), lora.delta(LINEAR)) < FP32


def tucker_loha() -> LoHa:
    return LoHa(
        tensor(2, 8), tensor(2, 6), tensor(2, 8), tensor(2, 6), tensor(2, 2, 3, 3), tensor(2, 2, 3, 3)
    )


def peft_full_lokr() -> LoKr:
    return LoKr(lokr_w1=tensor(2, 2), lokr_w2=tensor(5, 6), alpha=scalar(3.0), convention="peft", peft_rank=4)


def plain_loha() -> LoHa:
    return LoHa(tensor(10, 2), tensor(2, 12), tensor(10, 2), tensor(2, 12))


def test_tucker_loha_becomes_a_tucker_lora_with_kronecker_cores():
    loha = LoHa(
        tensor(2, 8), tensor(2, 6), tensor(2, 8), tensor(2, 6), tensor(2, 2, 3, 3), tensor(2, 2, 3, 3)
    )
    lora = LohaToLora().apply(loha, CONV)
    lora.check(CONV, "lora")
    assert lora.mid is not None and lora.mid.shape == (4, 4, 3, 3) and lora.rank == 4
    assert relative(loha.delta(CONV), lora.delta(CONV)) < FP32


def test_lokr_to_lora_uses_the_mixed_product_rule_without_svd():
    lokr = LoKr(lokr_w1=tensor(2, 2), lokr_w2_a=tensor(4, 1), lokr_w2_b=tensor(1, 27), alpha=scalar(0.5))
    lora = LokrToLora().apply(lokr, CONV)
    lora.check(CONV, "lora")
    assert lora.rank == 2  # min(a, c) · r
    assert relative(lokr.delta(CONV), lora.delta(CONV)) < FP32
    full = LoKr(lokr_w1=tensor(2, 2), lokr_w2=tensor(4, 3, 3, 3))
    dense = LokrToLora().apply(full, CONV)
    assert dense.rank == 8 and relative(full.delta(CONV), dense.delta(CONV)) < FP32


def test_full_to_lora_reuses_the_diff_bytes():
    diff = tensor(8, 6, 3, 3, dtype=torch.float16)
    lora = FullToLora().apply(Full(diff), CONV)
    lora.check(CONV, "lora")
    assert lora.down.read_bytes() == diff.read_bytes() and lora.up.dtype == "F16"
    assert torch.equal(lora.delta(CONV), Full(diff).delta(CONV))
    assert not FullToLora().applies(Full(diff, tensor(8)))


def test_bake_lokr_scale_moves_peft_alpha_over_r_into_w1():
    lokr = LoKr(lokr_w1=tensor(2, 2), lokr_w2=tensor(5, 6), alpha=scalar(3.0), convention="peft", peft_rank=4)
    baked = BakeLokrScale().apply(lokr, LINEAR)
    assert baked.convention == "lycoris" and baked.scale == 1.0 and "lokr.scaled_full" not in baked.features()
    assert relative(lokr.delta(LINEAR), baked.delta(LINEAR)) < FP32


ROUTES = {
    "plain loha to diffusers": (plain_loha, LINEAR, "diffusers", ["loha-to-lora"]),
    "tucker loha to diffusers": (tucker_loha, CONV, "diffusers", ["loha-to-lora", "merge-tucker-mid"]),
    "tucker loha to kohya": (tucker_loha, CONV, "kohya", ["loha-to-lora"]),
    "peft full lokr to lycoris": (peft_full_lokr, LINEAR, "lycoris", ["bake-lokr-scale"]),
    "peft full lokr to peft": (peft_full_lokr, LINEAR, "peft", []),
    "full to diffusers": (lambda: Full(tensor(10, 12)), LINEAR, "diffusers", ["full-to-lora"]),
    "loha to lycoris": (plain_loha, LINEAR, "lycoris", []),
}


@pytest.mark.parametrize("case", ROUTES)
def test_the_planner_takes_the_most_exact_shortest_route(case):
    make, layer, target, route = ROUTES[case]
    taken = best_route(make(), layer, capabilities(target), edges(), allow_lossy=False)
    assert [edge.name for edge in taken] == route


def test_dora_around_a_loha_keeps_its_dora_through_the_re_expression():
    loha = LoHa(tensor(10, 2), tensor(2, 12), tensor(10, 2), tensor(2, 12))
    dora = DoRA(loha, MemoryTensor.from_torch(torch.rand(10, 1) + 0.5), "output")
    route = best_route(dora, LINEAR, capabilities("kohya"), edges(), allow_lossy=False)
    assert [edge.name for edge in route] == ["loha-to-lora"]
    lowered = route[0].apply(dora, LINEAR)
    assert isinstance(lowered, DoRA) and isinstance(lowered.inner, LoRA)
    weight = torch.randn(10, 12, dtype=torch.float64)
    assert relative(dora.apply(weight, LINEAR), lowered.apply(weight, LINEAR)) < FP32
    input_axis = DoRA(loha, MemoryTensor.from_torch(torch.rand(1, 12) + 0.5), "input")
    assert best_route(input_axis, LINEAR, capabilities("diffusers"), edges(), allow_lossy=False) is None


@pytest.mark.parametrize(
    "adapter",
    [
        IA3(tensor(10), MemoryTensor.from_torch(torch.tensor(0))),
        Full(tensor(10, 12), tensor(10)),
        Norm(tensor(10)),
    ],
    ids=["ia3", "full-with-bias", "norm"],
)
def test_no_route_means_a_refusal_not_a_guess(adapter):
    layer = Layer("norm", 10, 10) if isinstance(adapter, Norm) else LINEAR
    assert best_route(adapter, layer, capabilities("diffusers"), edges(), allow_lossy=True) is None


def test_the_refusal_names_the_feature_without_a_route(tmp_path):
    """A full module with a bias delta to diffusers: `full.bias`, not `full`, is what no edge removes."""
    import loraformats

    path, _ = build(tmp_path, "full")
    with pytest.raises(UnsupportedError, match=r"cannot hold full\.bias .* no LoRA form"):
        loraformats.convert(path, "diffusers", tmp_path / "out.safetensors", family="tiny-sd1")
