"""LyCORIS key suffixes: which algorithm each belongs to and which adapter role it fills.

A module's algorithm is read from its suffix set (LyCORIS's own loader does the same,
`lycoris/modules/__init__.py:get_module`); `alpha` and `dora_scale` are shared. Suffixes that
LyCORIS writes but that no delta can be made of are refused with the reason, never dropped.
"""

from __future__ import annotations

#: suffix -> (suffix family, adapter role)
SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    **{f"hada_{n}": ("loha", f"hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{n}": ("lokr", f"lokr_{n}") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "weight": ("ia3", "weight"),
    "on_input": ("ia3", "on_input"),
    "diff": ("full", "diff"),
    "diff_b": ("full", "diff_b"),
    "w_norm": ("norm", "w_norm"),
    "b_norm": ("norm", "b_norm"),
    **{f"{n}.weight": ("glora", n) for n in ("a1", "a2", "b1", "b2", "bm")},
    "oft_blocks": ("oft", "oft_blocks"),
    "rescale": ("oft", "rescale"),
    "alpha": ("", "alpha"),
    "dora_scale": ("", "magnitude"),
}

#: adapter role -> suffix, per algorithm (the inverse, for writing)
ROLE_SUFFIX: dict[str, str] = {
    role: suffix for suffix, (family, role) in SUFFIXES.items() if family not in ("ia3", "glora")
}
GLORA_SUFFIX = {role: f"{role}.weight" for role in ("a1", "a2", "b1", "b2", "bm")}

#: Families whose modules may carry `alpha` (for OFT it is the constraint) and `dora_scale`.
WITH_ALPHA = {"lora", "loha", "lokr", "glora", "oft"}
WITH_DORA = {"lora", "loha", "lokr"}

#: Suffixes LyCORIS knows that cannot be converted, with the reason.
REFUSED: dict[str, str] = {
    "q_layer.weight": "T-LoRA",
    "p_layer.weight": "T-LoRA",
    "lambda_layer": "T-LoRA",
    "lokr_t1": "lokr_t1 (never created or read by LyCORIS)",
    "bias_indices": "sparse residual",
    "bias_values": "sparse residual",
    "bias_size": "sparse residual",
}
REASONS = {
    "T-LoRA": (
        "T-LoRA modules are refused: their change depends on the diffusion timestep (a rank mask set "
        "while sampling) and on base factors (base_q, base_p, base_lambda) that LyCORIS does not save, "
        "so the file alone does not determine a weight change"
    ),
    "lokr_t1 (never created or read by LyCORIS)": "lokr_t1 has no meaning in any LoKr loader",
    "sparse residual": (
        "the sparse residual of extract_locon (bias_indices/bias_values/bias_size) is read by no loader "
        "and is not supported"
    ),
}

#: How messages name each suffix family.
LABELS = {
    "lora": "LoRA/LoCon", "loha": "LoHa", "lokr": "LoKr", "ia3": "(IA)3", "full": "full diff",
    "norm": "norm", "glora": "GLoRA", "oft": "OFT",
}  # fmt: skip

#: The LyCORIS `algo` name (ss_network_args) of each canonical algorithm.
ALGO_NAMES = {
    "lora": "locon",
    "loha": "loha",
    "lokr": "lokr",
    "ia3": "ia3",
    "full": "full",
    "glora": "glora",
    "diag-oft": "diag-oft",
    "boft": "boft",
}
#: `algo` values that mean the same network (LyCORIS accepts both spellings).
ALGO_ALIASES = {"lora": "locon", "locon": "locon", "dylora": "locon"}


#: Each LyCORIS module's state-dict order (its `custom_state_dict`, else parameters then buffers):
#: the order LyCORIS hashes tensors in for `sshs_model_hash`.
STATE_ORDER: dict[str, tuple[str, ...]] = {
    "lora": ("dora_scale", "alpha", "lora_up.weight", "lora_down.weight", "lora_mid.weight"),
    "loha": ("alpha", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("alpha", "dora_scale", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
             "lokr_t2"),
    "glora": ("alpha", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"),
    "full": ("diff", "diff_b"),
    "norm": ("w_norm", "b_norm"),
    "ia3": ("weight", "on_input"),
    "oft": ("oft_blocks", "rescale", "alpha"),
}  # fmt: skip


def state_order(suffixes: set[str]) -> dict[str, int]:
    """The state-dict position of each suffix of one module (by the module's algorithm)."""
    family = next((SUFFIXES[s][0] for s in suffixes if SUFFIXES.get(s, ("",))[0]), "lora")
    return {suffix: i for i, suffix in enumerate(STATE_ORDER[family])}


def algorithm_of(families: set[str], blocks_ndim: int | None) -> str | None:
    """The canonical algorithm of a module with these suffix families, or None when they mix."""
    own = families - {""}
    if len(own) != 1:
        return None
    family = own.pop()
    if family == "oft":
        return {3: "diag-oft", 4: "boft"}.get(blocks_ndim or 0)
    return family
