"""Issue acceptance (1): files written by `lycoris-lora` itself are read exactly; round trips are identities.

Every file here is made by LyCORIS 4.1.3's own Kohya network (`LycorisNetworkKohya`) on a tiny diffusers
pipeline, with every parameter randomised (LyCORIS initialises to the identity), and saved with its
own `save_weights` (which adds its `sshs_model_hash`). Expected changes are computed twice, without
loraformats' adapter maths:

- `reference_changes`: the formulas of the research notes (§1.3–1.12), written out in this file from the
  raw tensors;
- `lycoris_changes`: LyCORIS's own training forward. Linear layers are run on an identity input (the
  forward pass itself); conv layers use the weight path the forward uses (`get_weight`/`make_weight`).
  LyCORIS's `merge_to` is not used: in 4.1.3 it applies alpha/r twice for LoHa and LoKr.

Additive modules are checked with `loraformats verify` against a full-diff file of the reference; the
others (DoRA, (IA)3, GLoRA, OFT) on a seeded random base.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraformats
from lora_factory import relative_error
from loraformats.plugins import registry
from test_round_trips import raw_file
from tiny import build_pipeline, tiny_family

ROOT = Path(__file__).parents[1]
Key = tuple[str, str]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# ------------------------------------------------------------------------------------------ the plugin


def ensure_lycoris_plugin() -> bool:
    """Register `loraformats_lycoris` as its entry point would; True if this call registered it.

    Until pyproject.toml declares the entry point (and maps the package), the package is loaded from
    `plugins/` by path, through the same public `registry.register` a third party would use.
    """
    if "lycoris" in registry.formats():
        return False
    if "loraformats_lycoris" not in sys.modules:
        location = ROOT / "plugins" / "loraformats_lycoris"
        spec = importlib.util.spec_from_file_location(
            "loraformats_lycoris", location / "__init__.py", submodule_search_locations=[str(location)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["loraformats_lycoris"] = module
        spec.loader.exec_module(module)
    registry.register(sys.modules["loraformats_lycoris"], name="lycoris")
    return True


@pytest.fixture(autouse=True, scope="module")
def lycoris_plugin():
    registered = ensure_lycoris_plugin()
    yield
    if registered:
        registry.unregister("lycoris")


@pytest.fixture(autouse=True)
def quiet_lycoris():
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)


# ------------------------------------------------------------------------------------------ LyCORIS files


class CheckpointNames(torch.nn.Module):
    """A transformers-5 `CLIPTextModel` under `text_model.`, as sd-scripts' models name it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = model


PRESET_ATTRIBUTES = (
    "ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
    "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME",
)  # fmt: skip


@contextmanager
def sd_preset():
    """LyCORIS's `full` preset minus `TimestepEmbedding` (4.1.3 targets it by class *and* by name on SD
    UNets and then refuses its own duplicate); restores the class-level preset afterwards."""
    from lycoris.config import FULL_TEXT_ENCODER_MODULES, FULL_UNET_MODULES, FULL_UNET_NAMES
    from lycoris.kohya import LycorisNetworkKohya

    saved = {name: getattr(LycorisNetworkKohya, name) for name in PRESET_ATTRIBUTES}
    LycorisNetworkKohya.apply_preset(
        {
            "enable_conv": True,
            "unet_target_module": [m for m in FULL_UNET_MODULES if m != "TimestepEmbedding"],
            "unet_target_name": FULL_UNET_NAMES,
            "text_encoder_target_module": FULL_TEXT_ENCODER_MODULES,
            "text_encoder_target_name": [],
        }
    )
    try:
        yield LycorisNetworkKohya
    finally:
        for name, value in saved.items():
            setattr(LycorisNetworkKohya, name, value)


def randomise(network: Any, generator: torch.Generator) -> None:
    """Every trainable tensor random (LyCORIS starts every adapter at the identity)."""
    with torch.no_grad():
        for lora in network.loras:
            for name, parameter in lora.named_parameters(recurse=True):
                if name == "dora_scale":
                    base = parameter.detach().clone()
                    parameter.copy_(base * (0.5 + torch.rand(base.shape, generator=generator)))
                elif name == "oft_blocks":
                    parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
                elif name == "rescale":
                    parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
                elif type(lora).__name__ == "FullModule" and name in ("weight", "bias"):
                    parameter.add_(torch.randn(parameter.shape, generator=generator))
                else:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))


def make_lycoris(
    path: Path,
    algo: str,
    family_name: str = "tiny-sd1",
    *,
    dim: int = 4,
    alpha: float = 2.0,
    conv_dim: int = 4,
    conv_alpha: float = 3.0,
    text_encoders: bool = True,
    seed: int = 0,
    **network_args: Any,
) -> tuple[Any, Any]:
    """A LyCORIS file made by LyCORIS: (its network, the pipeline it was made on — base weights included)."""
    pipe = build_pipeline(family_name)
    encoders = [getattr(pipe, c.name) for c in tiny_family(family_name).text_encoders()]
    encoders = [e if hasattr(e, "text_model") else CheckpointNames(e) for e in encoders]
    text_encoder = (encoders if len(encoders) > 1 else encoders[0]) if text_encoders else None
    with sd_preset() as network_class:
        network = network_class(
            text_encoder,
            pipe.unet,
            multiplier=1.0,
            lora_dim=dim,
            conv_lora_dim=conv_dim,
            alpha=alpha,
            conv_alpha=conv_alpha,
            network_module=algo,
            **network_args,
        )
    network.apply_to(text_encoder, pipe.unet, True, True)
    randomise(network, torch.Generator().manual_seed(seed))
    args = {"algo": algo, "conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)}
    args |= {NETWORK_ARGS.get(key, key): str(value) for key, value in network_args.items()}
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": "sd_v1",
    }
    network.save_weights(str(path), None, metadata)
    return network, pipe


#: LyCORIS keyword arguments -> the `network_args` names sd-scripts records them under.
NETWORK_ARGS = {"weight_decompose": "dora_wd", "wd_on_out": "wd_on_output"}


def base_weight(module: Any) -> torch.Tensor:
    """The original weight a LyCORIS module adapts (FullModule keeps its own copy)."""
    if type(module).__name__ == "FullModule":
        return module.org_weight.detach().to(torch.float64)
    return module.org_module[0].weight.detach().to(torch.float64)


def lycoris_changes(network: Any) -> dict[str, torch.Tensor]:
    """W' - W per LyCORIS module name, as LyCORIS's training forward computes it (float64)."""
    changes = {}
    with torch.no_grad():
        for lora in network.loras:
            name = type(lora).__name__
            precision = torch.float32 if "OFT" in name else torch.float64  # LyCORIS inverts in float32
            lora.to(precision)
            base = base_weight(lora)
            layer = lora.org_module[0]
            if isinstance(layer, torch.nn.Linear) and name not in ("FullModule", "NormModule"):
                saved = layer.weight.data
                layer.weight.data = saved.to(precision)
                bias, layer.bias = layer.bias, None
                try:
                    eye = torch.eye(layer.in_features, dtype=precision)
                    merged = lora(eye).T  # forward on an identity: y = x W'^T
                finally:
                    layer.weight.data, layer.bias = saved, bias
            elif name in ("LoConModule", "LohaModule", "LokrModule"):
                if name == "LoConModule":
                    diff = lora.make_weight() * lora.scale
                else:
                    diff = lora.get_weight(lora.shape).to(torch.float64)
                merged = base + diff.reshape(base.shape)
                if lora.wd:
                    merged = lora.apply_weight_decompose(merged, 1.0)
            elif name == "NormModule":
                merged = base + lora.w_norm.to(torch.float64)
            elif name == "FullModule":  # apply_to moved the layer's weight into the module (W + diff)
                merged = lora.weight.detach()
            else:
                lora.org_module[0].weight.data = lora.org_module[0].weight.data.to(precision)
                merged = lora.get_merged_weight(multiplier=1.0)[0]
            changes[lora.lora_name] = (merged.to(torch.float64) - base).reshape(base.shape)
    return changes


# ------------------------------------------------------------------------------------------ references


def _kron_w2(roles: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    if "lokr_w2" in roles:
        return roles["lokr_w2"]
    a, b = roles["lokr_w2_a"], roles["lokr_w2_b"]
    if "lokr_t2" in roles:
        return torch.einsum("xyhw,xp,yq->pqhw", roles["lokr_t2"], a, b)
    w2 = a @ b.reshape(b.shape[0], -1)
    return w2.reshape(w2.shape[0], -1, *shape[2:]) if len(shape) == 4 else w2


def reference_change(roles: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """W' - W from a module's raw tensors (float64), by the research notes' formulas."""
    shape = tuple(weight.shape)
    alpha = float(roles["alpha"]) if "alpha" in roles else 0.0
    if "lora_down.weight" in roles:
        down, up = roles["lora_down.weight"], roles["lora_up.weight"]
        r = down.shape[0]
        if "lora_mid.weight" in roles:
            delta = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), roles["lora_mid.weight"], down.flatten(1))
        else:
            delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        delta = delta * (alpha or r) / r
    elif "hada_w1_a" in roles:
        r = roles["hada_w1_b"].shape[0]
        if "hada_t1" in roles:
            parts = [[roles[f"hada_{k}"] for k in (f"t{n}", f"w{n}_a", f"w{n}_b")] for n in (1, 2)]
            halves = [torch.einsum("abhw,ao,bi->oihw", *part) for part in parts]
        else:
            halves = [(roles[f"hada_w{n}_a"] @ roles[f"hada_w{n}_b"]).reshape(shape) for n in (1, 2)]
        delta = halves[0] * halves[1] * (alpha or r) / r
    elif any(k.startswith("lokr_") for k in roles):
        w1 = roles["lokr_w1"] if "lokr_w1" in roles else roles["lokr_w1_a"] @ roles["lokr_w1_b"]
        w2 = _kron_w2(roles, shape)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        rank = next((roles[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in roles), None)
        scale = 1.0 if rank is None else (alpha or rank) / rank
        delta = torch.kron(w1.contiguous(), w2.contiguous()) * scale
    elif "diff" in roles:
        delta = roles["diff"]
    elif "w_norm" in roles:
        delta = roles["w_norm"]
    elif "on_input" in roles:
        v = roles["weight"].flatten()
        side = [1] * weight.dim()
        side[1 if int(roles["on_input"]) else 0] = -1
        delta = weight * v.reshape(side)
    elif "a1.weight" in roles:
        a1, a2 = roles["a1.weight"].flatten(1), roles["a2.weight"].flatten(1)
        b1, b2 = roles["b1.weight"].flatten(1), roles["b2.weight"].flatten(1)
        r = a2.shape[0]
        per_position = weight.reshape(*shape[:2], -1, 1)
        proportional = torch.einsum("oihw,ij,jk->okhw", per_position, a1, a2).reshape(shape)
        delta = (proportional + (b1 @ b2).reshape(shape)) * (alpha or r) / r
    elif "oft_blocks" in roles:
        delta = _oft(roles, weight) - weight
    else:
        raise AssertionError(f"no reference for {sorted(roles)}")
    if "dora_scale" in roles:
        merged = weight + delta
        m = roles["dora_scale"]
        dims = tuple(d for d in range(merged.dim()) if m.shape[d] == 1)
        merged = merged * (m / torch.linalg.vector_norm(merged, dim=dims, keepdim=True))
        delta = merged - weight
    return delta


def _cayley(blocks: torch.Tensor, constraint: float, out: int) -> torch.Tensor:
    q = blocks - blocks.transpose(-1, -2)
    norm = torch.linalg.vector_norm(q) + 1e-8
    if constraint > 0 and norm > constraint * out:
        q = q * (constraint * out / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return torch.linalg.solve((eye - q).transpose(-1, -2), (eye + q).transpose(-1, -2)).transpose(-1, -2)


def _oft(roles: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    blocks, out = roles["oft_blocks"], weight.shape[0]
    rotations = _cayley(blocks, float(roles.get("alpha", torch.tensor(0.0))), out)
    rows = weight.reshape(out, -1)
    if blocks.dim() == 3:  # W'_k = R_kᵀ W_k
        count, size, _ = blocks.shape
        result = torch.cat([rotations[k].T @ rows[k * size : (k + 1) * size] for k in range(count)])
    else:  # butterfly: a permutation per stage, R (not Rᵀ) on consecutive row blocks
        stages, _, size, _ = blocks.shape
        result = rows
        for stage in range(stages):
            width = 2**stage * size // 2
            order = torch.arange(out).reshape(-1, 2, width).transpose(1, 2).reshape(-1)
            permuted = result[order]
            rotated = torch.cat(
                [rotations[stage, j] @ permuted[j * size : (j + 1) * size] for j in range(out // size)]
            )
            result = torch.empty_like(rotated)
            result[order] = rotated
    if "rescale" in roles:
        result = result * roles["rescale"].reshape(-1, 1)
    return result.reshape(weight.shape)


def grouped(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(path)).items():
        stem, _, suffix = name.partition(".")
        modules.setdefault(stem, {})[suffix] = tensor.to(torch.float64)
    return modules


def reference_changes(path: Path, network: Any) -> dict[str, torch.Tensor]:
    """W' - W per module of a LyCORIS file, from its raw tensors and the network's base weights."""
    bases = {lora.lora_name: base_weight(lora) for lora in network.loras}
    return {stem: reference_change(roles, bases[stem]) for stem, roles in grouped(path).items()}


def module_keys(path: Path, family_name: str) -> dict[str, Key]:
    """File key stem -> (component, canonical path), as loraformats resolves the names."""
    from loraformats.assemble import resolve
    from loraformats.pickles import open_header

    header = open_header(path)
    parsed = registry.formats()["lycoris"].parse(header)
    resolution = resolve(parsed, header, tiny_family(family_name))
    assert resolution.fits, resolution.summary()
    return {m.module.key: (m.component.name, m.path) for m in resolution.matches}


# ------------------------------------------------------------------------------------------ cases


#: (algo, network arguments, LyCORIS network keyword arguments) per file kind.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "locon": ("locon", {}),
    "locon-tucker": ("locon", {"use_tucker": True}),
    "loha": ("loha", {}),
    "loha-tucker": ("loha", {"use_tucker": True}),
    "lokr-factor": ("lokr", {"factor": 4}),
    "lokr-factor-2": ("lokr", {"factor": 2}),
    "lokr-decompose-both": ("lokr", {"decompose_both": True, "dim": 1, "conv_dim": 2}),
    "lokr-full-matrix": ("lokr", {"full_matrix": True}),
    "lokr-tucker": ("lokr", {"use_tucker": True, "factor": 2}),
    "ia3-output": ("ia3", {}),
    "ia3-input": ("ia3", {"train_on_input": True}),
    "full": ("full", {}),
    "glora": ("glora", {}),
    "diag-oft": ("diag-oft", {"constraint": 1e-3, "rescaled": True}),
    "boft": ("boft", {"constraint": 1e-3, "rescaled": True, "dim": 2, "text_encoders": False}),
    "locon-dora-output": ("locon", {"weight_decompose": True, "wd_on_out": True}),
    "locon-dora-input": ("locon", {"weight_decompose": True, "wd_on_out": False}),
    "loha-dora-output": ("loha", {"weight_decompose": True, "wd_on_out": True}),
    "loha-dora-input": ("loha", {"weight_decompose": True, "wd_on_out": False}),
    "lokr-dora-input": ("lokr", {"weight_decompose": True, "wd_on_out": False, "factor": 4}),
    "locon-norm": ("locon", {"train_norm": True}),
}


def build(tmp_path: Path, case: str, seed: int = 0) -> tuple[Path, Any]:
    algo, arguments = CASES[case]
    arguments = dict(arguments)
    settings = {key: arguments.pop(key) for key in ("dim", "conv_dim", "text_encoders") if key in arguments}
    path = tmp_path / f"{case}.safetensors"
    network, _ = make_lycoris(path, algo, seed=seed, **settings, **arguments)
    return path, network


FP32 = 1e-6  # relative error of a change computed from float32 tensors


@pytest.mark.parametrize("case", CASES)
def test_lycoris_files_change_every_module_as_the_forward_pass_does(tmp_path, case):
    """Every module LyCORIS wrote is read, and makes the change LyCORIS's forward and the formulas make."""
    path, network = build(tmp_path, case)
    keys = module_keys(path, "tiny-sd1")
    expected = reference_changes(path, network)
    forward = lycoris_changes(network)
    assert set(keys) == set(expected) == set(forward) == {lora.lora_name for lora in network.loras}

    adapters = loraformats.load(path, family="tiny-sd1")
    kohya_keys_only = case.startswith("locon") and case != "locon-norm"  # Kohya's own grammar: its format
    assert adapters.provenance.format == ("kohya" if kohya_keys_only else "lycoris")
    assert len(adapters.modules) == len(keys)
    bases = {lora.lora_name: base_weight(lora) for lora in network.loras}
    for stem, key in keys.items():
        layer, adapter = adapters.layer(key), adapters.modules[key]
        base = bases[stem].reshape(layer.weight_shape)
        ours = (adapter.apply(base, layer) - base).reshape(bases[stem].shape)
        limit = 1e-5 if "oft" in case else FP32  # LyCORIS's OFT runs in float32 whatever the inputs
        assert relative_error(expected[stem], forward[stem]) < limit, (stem, "reference vs LyCORIS")
        assert relative_error(expected[stem], ours) < 1e-10, (stem, adapter.algorithm)


ADDITIVE = ["locon", "locon-tucker", "loha", "loha-tucker", "lokr-factor", "lokr-decompose-both",
            "lokr-full-matrix", "lokr-tucker", "full", "locon-norm"]  # fmt: skip


@pytest.mark.parametrize("case", ADDITIVE)
def test_verify_agrees_with_an_independent_full_diff_file(tmp_path, case):
    """`loraformats verify` on the LyCORIS file and a full-diff file of the reference changes (float64)."""
    path, network = build(tmp_path, case)
    expected = reference_changes(path, network)
    raw = grouped(path)
    reference = {}
    for stem, change in expected.items():
        key = "w_norm" if "w_norm" in raw[stem] else "diff"
        reference[f"{stem}.{key}"] = change.contiguous()
        for bias in ("diff_b", "b_norm"):
            if bias in raw[stem]:
                reference[f"{stem}.{bias}"] = raw[stem][bias].contiguous()
    reference_path = tmp_path / "reference.safetensors"
    save_file(reference, str(reference_path))
    report = loraformats.verify(path, reference_path, family="tiny-sd1")
    assert report.ok and report.modules == len(expected), report
    assert report.max_relative_error < 1e-12


def assert_same_file(source: Path, copy: Path) -> None:
    """Same tensor names, dtypes, shapes and bytes; every source metadata entry with its value."""
    tensors, metadata = raw_file(source)
    copied, copied_metadata = raw_file(copy)
    assert set(copied) == set(tensors)
    different = [name for name in tensors if copied[name] != tensors[name]]
    assert not different, different[:5]
    assert {key: copied_metadata.get(key) for key in metadata} == metadata


@pytest.mark.parametrize("case", CASES)
def test_round_trip_through_lycoris_is_an_identity(tmp_path, case):
    path, _ = build(tmp_path, case)
    middle, back = tmp_path / "middle.safetensors", tmp_path / "back.safetensors"
    source_format = loraformats.load(path, family="tiny-sd1").provenance.format
    there = loraformats.convert(path, "lycoris", middle, family="tiny-sd1")
    again = loraformats.convert(middle, source_format, back, family="tiny-sd1")
    assert there.exactness == again.exactness == "identical", (there.steps, again.steps)
    assert_same_file(path, back)
    assert raw_file(middle)[1]["sshs_model_hash"] == raw_file(path)[1]["sshs_model_hash"]


@pytest.mark.parametrize("case", ["locon", "locon-tucker", "locon-dora-output", "locon-dora-input"])
def test_lycoris_locon_through_kohya_is_an_identity(tmp_path, case):
    path, _ = build(tmp_path, case)
    middle, back = tmp_path / "middle.safetensors", tmp_path / "back.safetensors"
    loraformats.convert(path, "kohya", middle, family="tiny-sd1", source_format="lycoris")
    loraformats.convert(middle, "lycoris", back, family="tiny-sd1")
    assert_same_file(path, back)
