"""The canonical LyCORIS adapters against independent computations (no LyCORIS, no loraformats maths).

Every expected W' is written out here from the definitions (loops and explicit index formulas where an
einsum would mirror the implementation), on random non-identity factors, float64.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from loraformats.adapters import BOFT, IA3, DiagOFT, DoRA, Full, GLoRA, LoHa, LoKr, LoRA, Norm
from loraformats.errors import InvalidFileError
from loraformats.families import Layer
from loraformats.tensors import MemoryTensor

LINEAR = Layer("linear", 12, 10)
CONV = Layer("conv2d", 6, 8, (3, 3))
POINTWISE = Layer("conv2d", 6, 8, (1, 1))


def tensor(*shape: int, seed: list[int] = [0]) -> MemoryTensor:  # noqa: B006 (a counter on purpose)
    seed[0] += 1
    return MemoryTensor.from_torch(torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])))


def scalar(value: float) -> MemoryTensor:
    return MemoryTensor.from_torch(torch.tensor(value))


def t(data: MemoryTensor) -> torch.Tensor:
    return data.to_torch().to(torch.float64)


def base(layer: Layer) -> torch.Tensor:
    return torch.randn(layer.weight_shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor, limit: float = 1e-12) -> bool:
    return float((a - b).norm()) <= limit * max(float(a.norm()), float(b.norm()), 1e-300)


def kernel_of(layer: Layer) -> tuple[int, int]:
    return layer.kernel if layer.kind == "conv2d" else (1, 1)


# ------------------------------------------------------------------------------------------ LoHa


def loha_expected(adapter: LoHa, layer: Layer, gamma: float) -> torch.Tensor:
    out, inp = layer.out_features, layer.in_features
    kh, kw = kernel_of(layer)
    delta = torch.zeros(out, inp, kh, kw, dtype=torch.float64)
    halves = []
    for n in (1, 2):
        a, b = t(getattr(adapter, f"hada_w{n}_a")), t(getattr(adapter, f"hada_w{n}_b"))
        if adapter.hada_t1 is None:
            halves.append((a.reshape(out, -1) @ b.reshape(b.shape[0], -1)).reshape(out, inp, kh, kw))
        else:
            core = t(getattr(adapter, f"hada_t{n}"))
            half = torch.zeros(out, inp, kh, kw, dtype=torch.float64)
            for x, y in itertools.product(range(core.shape[0]), range(core.shape[1])):
                half += core[x, y][None, None] * a[x][:, None, None, None] * b[y][None, :, None, None]
            halves.append(half)
    delta = gamma * halves[0] * halves[1]
    return delta.reshape(layer.weight_shape)


@pytest.mark.parametrize("layer", [LINEAR, CONV, POINTWISE], ids=["linear", "conv", "1x1"])
@pytest.mark.parametrize("ranks", [(2, 2), (3, 2)])
def test_loha_is_the_hadamard_product_of_two_low_rank_products(layer, ranks):
    kh, kw = kernel_of(layer)
    r1, r2 = ranks
    loha = LoHa(
        tensor(layer.out_features, r1), tensor(r1, layer.in_features * kh * kw),
        tensor(layer.out_features, r2), tensor(r2, layer.in_features * kh * kw), alpha=scalar(1.5),
    )  # fmt: skip
    loha.check(layer, "loha")
    expected = loha_expected(loha, layer, 1.5 / r1)
    assert close(loha.delta(layer), expected)
    weight = base(layer)
    assert close(loha.apply(weight, layer) - weight, expected)
    factors = loha.low_rank(layer)
    if r1 * r2 >= min(layer.out_features, layer.in_features * kh * kw):
        assert factors is None  # not low-rank: the dense delta is smaller
    else:
        up, down = factors
        assert up.shape[1] == r1 * r2 and close((up @ down).reshape(layer.weight_shape), expected)


def test_tucker_loha_uses_each_core_for_its_own_product():
    r = 2
    loha = LoHa(
        tensor(r, 8), tensor(r, 6), tensor(r, 8), tensor(r, 6), tensor(r, r, 3, 3), tensor(r, r, 3, 3)
    )
    loha.check(CONV, "tucker")
    assert close(loha.delta(CONV), loha_expected(loha, CONV, 1.0))
    assert "loha.tucker" in loha.features()


def test_four_dimensional_plain_loha_factors_are_accepted():
    """Some trainers write (O, r, 1, 1) / (r, I, kh, kw); the values are the 2-D ones."""
    flat = LoHa(tensor(8, 2), tensor(2, 54), tensor(8, 2), tensor(2, 54))
    shaped = LoHa(*(f.reshaped(s) for f, s in zip(
        (flat.hada_w1_a, flat.hada_w1_b, flat.hada_w2_a, flat.hada_w2_b),
        ((8, 2, 1, 1), (2, 6, 3, 3), (8, 2, 1, 1), (2, 6, 3, 3)), strict=True)))  # fmt: skip
    shaped.check(CONV, "4-D")
    assert close(shaped.delta(CONV), flat.delta(CONV))


def test_a_loha_that_does_not_fit_is_refused():
    loha = LoHa(tensor(8, 2), tensor(2, 6), tensor(8, 2), tensor(2, 6))
    with pytest.raises(InvalidFileError, match="hada_w1_b"):
        loha.check(CONV, "x")
    assert LoHa.factor_problem({"hada_w1_a": (8, 2)}).startswith("a LoHa module needs")


# ------------------------------------------------------------------------------------------ LoKr


def lokr_expected(w1: torch.Tensor, w2: torch.Tensor, layer: Layer, gamma: float) -> torch.Tensor:
    """ΔW[i·b + p, j·d + q, h, w] = γ W1[i, j] W2[p, q, h, w], by explicit indices."""
    a, c = w1.shape
    b, d = w2.shape[0], layer.in_features // c
    kh, kw = kernel_of(layer)
    w2 = w2.reshape(b, d, kh, kw)
    delta = torch.zeros(a * b, c * d, kh, kw, dtype=torch.float64)
    for i, j in itertools.product(range(a), range(c)):
        delta[i * b : (i + 1) * b, j * d : (j + 1) * d] = w1[i, j] * w2
    return (gamma * delta).reshape(layer.weight_shape)


def lokr_variants(layer: Layer):
    """(name, adapter, W1, W2 (b, d[, kh, kw]), γ) for every factor layout on `layer`."""
    kh, kw = kernel_of(layer)
    a, c = 2, 2
    b, d = layer.out_features // a, layer.in_features // c
    alpha = scalar(3.0)
    w1, w1a, w1b = tensor(a, c), tensor(a, 1), tensor(1, c)
    w2 = tensor(b, d, kh, kw) if layer.kind == "conv2d" else tensor(b, d)
    w2a, w2b = tensor(b, 2), tensor(2, d * kh * kw)
    out = [
        ("full-dec", LoKr(lokr_w1=w1, lokr_w2_a=w2a, lokr_w2_b=w2b, alpha=alpha),
         t(w1), t(w2a) @ t(w2b), 1.5),
        ("dec-dec", LoKr(lokr_w1_a=w1a, lokr_w1_b=w1b, lokr_w2_a=w2a, lokr_w2_b=w2b, alpha=alpha),
         t(w1a) @ t(w1b), t(w2a) @ t(w2b), 1.5),
        ("dec-full", LoKr(lokr_w1_a=w1a, lokr_w1_b=w1b, lokr_w2=w2, alpha=alpha),
         t(w1a) @ t(w1b), t(w2), 3.0),
        ("full-full", LoKr(lokr_w1=w1, lokr_w2=w2, alpha=alpha), t(w1), t(w2), 1.0),
        ("full-full-peft", LoKr(lokr_w1=w1, lokr_w2=w2, alpha=alpha, convention="peft", peft_rank=4),
         t(w1), t(w2), 0.75),
    ]  # fmt: skip
    if layer.kind == "conv2d" and (kh, kw) != (1, 1):
        ta, tb, core = tensor(2, b), tensor(2, d), tensor(2, 2, kh, kw)
        tucker = torch.zeros(b, d, kh, kw, dtype=torch.float64)
        for x, y in itertools.product(range(2), range(2)):
            tucker += (
                t(core)[x, y][None, None] * t(ta)[x][:, None, None, None] * t(tb)[y][None, :, None, None]
            )
        lokr = LoKr(lokr_w1=w1, lokr_w2_a=ta, lokr_w2_b=tb, lokr_t2=core, alpha=alpha)
        out.append(("tucker", lokr, t(w1), tucker, 1.5))
    return out


@pytest.mark.parametrize("layer", [LINEAR, CONV, POINTWISE], ids=["linear", "conv", "1x1"])
def test_lokr_is_the_kronecker_product_of_its_factors(layer):
    for name, lokr, w1, w2, gamma in lokr_variants(layer):
        lokr.check(layer, name)
        expected = lokr_expected(w1, w2, layer, gamma)
        assert close(lokr.delta(layer), expected), name
        assert lokr.scale == pytest.approx(gamma), name
        factors = lokr.low_rank(layer)
        if factors is not None:
            assert close((factors[0] @ factors[1]).reshape(layer.weight_shape), expected), name


def test_only_a_peft_lokr_with_two_full_factors_needs_the_scaled_full_feature():
    features = {name: lokr.features() for name, lokr, *_ in lokr_variants(LINEAR)}
    assert "lokr.scaled_full" in features["full-full-peft"]
    assert not any("lokr.scaled_full" in f for name, f in features.items() if name != "full-full-peft")


def test_lokr_shapes_that_do_not_multiply_out_are_refused():
    lokr = LoKr(lokr_w1=tensor(2, 2), lokr_w2=tensor(4, 6))
    with pytest.raises(InvalidFileError, match="do not fit"):
        lokr.check(LINEAR, "x")
    assert "not both" in LoKr.factor_problem({"lokr_w1": (2, 2), "lokr_w1_a": (2, 1), "lokr_w1_b": (1, 2),
                                              "lokr_w2": (5, 6)})  # fmt: skip


# ------------------------------------------------------------------------------------------ W-dependent


@pytest.mark.parametrize("layer", [LINEAR, CONV], ids=["linear", "conv"])
@pytest.mark.parametrize("input_side", [False, True])
def test_ia3_scales_rows_or_columns_by_one_plus_v(layer, input_side):
    count = layer.in_features if input_side else layer.out_features
    vector = tensor(1, count, 1, 1) if layer.kind == "conv2d" else tensor(count)
    ia3 = IA3(vector, MemoryTensor.from_torch(torch.tensor(int(input_side))))
    ia3.check(layer, "ia3")
    weight = base(layer)
    v = t(vector).flatten()
    expected = weight.clone()
    for index in range(count):
        if input_side:
            expected[:, index] *= 1 + v[index]
        else:
            expected[index] *= 1 + v[index]
    assert close(ia3.apply(weight, layer), expected)


def test_ia3_on_the_wrong_side_is_refused():
    ia3 = IA3(tensor(12), MemoryTensor.from_torch(torch.tensor(0)))
    with pytest.raises(InvalidFileError, match="output side"):
        ia3.check(LINEAR, "x")


@pytest.mark.parametrize("layer", [LINEAR, CONV], ids=["linear", "conv"])
def test_glora_current_and_legacy_layouts(layer):
    kh, kw = kernel_of(layer)
    out, inp, r = layer.out_features, layer.in_features, 3
    unit = (1, 1) if layer.kind == "conv2d" else ()
    a1, a2, b1, b2 = (
        tensor(inp, r, *unit),
        tensor(r, inp, *unit),
        tensor(out, r, *unit),
        tensor(r, inp, kh, kw),
    )
    if layer.kind == "linear":
        b2 = b2.reshaped((r, inp))
    current = GLoRA(a1, a2, b1, b2, alpha=scalar(6.0))
    assert GLoRA.layout_for({k: v.shape for k, v in current.tensors().items()}, layer) == "lycoris"
    weight = base(layer)
    expected = weight.clone()
    flat_a = t(a1).reshape(inp, r) @ t(a2).reshape(r, inp)
    for h, w in itertools.product(range(kh), range(kw)):
        plane = weight[..., h, w] if layer.kind == "conv2d" else weight
        moved = 2.0 * plane @ flat_a
        if layer.kind == "conv2d":
            expected[..., h, w] += moved
        else:
            expected += moved
    expected += 2.0 * (t(b1).reshape(out, r) @ t(b2).reshape(r, -1)).reshape(layer.weight_shape)
    current.check(layer, "glora")
    assert close(current.apply(weight, layer), expected)
    # the same maths in the pre-3.0 layout: a1 <-> a2 and b1 <-> b2 swap roles (and orientations)
    legacy = GLoRA(a2, a1, b2, b1, alpha=scalar(6.0), layout="legacy")
    legacy.check(layer, "legacy")
    assert close(legacy.apply(weight, layer), expected)


def test_full_and_norm_deltas_carry_their_bias_deltas_separately():
    diff, bias = tensor(10, 12), tensor(10)
    full = Full(diff, bias)
    full.check(LINEAR, "full")
    assert close(full.delta(LINEAR), t(diff)) and close(full.bias_delta(LINEAR), t(bias))
    assert full.features() == {"full", "full.bias"}
    norm_layer = Layer("norm", 16, 16)
    norm = Norm(tensor(16), tensor(16))
    norm.check(norm_layer, "norm")
    assert close(norm.delta(norm_layer), t(norm.w_norm)) and close(
        norm.bias_delta(norm_layer), t(norm.b_norm)
    )
    with pytest.raises(InvalidFileError, match="norm layers"):
        Norm(tensor(10)).check(LINEAR, "x")
    with pytest.raises(InvalidFileError, match="one value per output"):
        Full(diff, tensor(12)).check(LINEAR, "x")


def cayley(q: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def test_diag_oft_rotates_output_row_blocks_by_r_transposed():
    blocks = MemoryTensor.from_torch(0.1 * torch.randn(5, 2, 2, generator=torch.Generator().manual_seed(1)))
    rescale = MemoryTensor.from_torch(0.5 + torch.rand(10, 1, generator=torch.Generator().manual_seed(2)))
    oft = DiagOFT(blocks, alpha=scalar(0.0), rescale=rescale)
    oft.check(LINEAR, "oft")
    weight = base(LINEAR)
    raw = t(blocks)
    expected = torch.cat([cayley(raw[k] - raw[k].T).T @ weight[2 * k : 2 * k + 2] for k in range(5)])
    expected = expected * t(rescale)
    assert close(oft.apply(weight, LINEAR), expected)


def test_the_oft_constraint_bounds_the_skew_norm_by_alpha_times_outputs():
    raw = torch.randn(5, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    constraint = scalar(0.01)  # stored as float32, as LyCORIS saves it
    oft = DiagOFT(MemoryTensor.from_torch(raw), alpha=constraint)
    q = raw - raw.transpose(1, 2)
    q = q * (constraint.scalar() * 10 / (float(torch.linalg.vector_norm(q)) + 1e-8))
    weight = base(LINEAR)
    expected = torch.cat([cayley(q[k]).T @ weight[2 * k : 2 * k + 2] for k in range(5)])
    assert close(oft.apply(weight, LINEAR), expected, 1e-10)


def test_boft_is_a_product_of_butterfly_permuted_block_rotations():
    layer = Layer("linear", 4, 8)
    raw = 0.1 * torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    boft = BOFT(MemoryTensor.from_torch(raw))
    boft.check(layer, "boft")
    weight = base(layer)
    expected = weight
    for stage in range(3):
        # stage i pairs rows 2^i apart inside groups of 2^(i+1): build that permutation matrix explicitly
        order = torch.arange(8).reshape(-1, 2, 2**stage).transpose(1, 2).reshape(-1)
        permutation = torch.eye(8, dtype=torch.float64)[order]
        rotation = torch.block_diag(*[cayley(raw[stage, j] - raw[stage, j].T) for j in range(4)])
        expected = permutation.T @ rotation @ permutation @ expected
    assert close(boft.apply(weight, layer), expected)


# ------------------------------------------------------------------------------------------ DoRA


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_dora_wraps_lora_loha_and_lokr_on_either_axis(kind, axis):
    layer = CONV
    inner = {
        "lora": LoRA(tensor(2, 6, 3, 3), tensor(8, 2, 1, 1), alpha=scalar(1.0)),
        "loha": LoHa(tensor(8, 2), tensor(2, 54), tensor(8, 2), tensor(2, 54), alpha=scalar(1.0)),
        "lokr": LoKr(
            lokr_w1=tensor(2, 2), lokr_w2_a=tensor(4, 2), lokr_w2_b=tensor(2, 27), alpha=scalar(2.0)
        ),
    }[kind]
    count = layer.out_features if axis == "output" else layer.in_features
    shape = (count, 1, 1, 1) if axis == "output" else (1, count, 1, 1)
    magnitude = MemoryTensor.from_torch(torch.rand(shape, generator=torch.Generator().manual_seed(5)) + 0.5)
    roles = {**inner.tensors(), "magnitude": magnitude}
    dora = DoRA.from_roles(roles, {"magnitude_axis": axis})
    assert type(dora.inner) is type(inner)
    dora.check(layer, kind)
    weight = base(layer)
    merged = weight + inner.delta(layer)
    m = t(magnitude)
    if axis == "output":
        norms = torch.stack([merged[o].norm() for o in range(8)]).reshape(8, 1, 1, 1)
    else:
        norms = torch.stack([merged[:, i].norm() for i in range(6)]).reshape(1, 6, 1, 1)
    assert close(dora.apply(weight, layer), merged * m / norms)
    expected_features = {"dora", f"dora.{axis}", *inner.features()}
    if kind != "lora":
        expected_features.add(f"{kind}.dora")
    assert dora.features() == expected_features
