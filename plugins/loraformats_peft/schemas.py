"""The pydantic models of PEFT's adapter configs, imported when a config is read or written
(pydantic is not imported by commands that never meet one)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import ConfigDict, Field

from loraformats.deferred import DeferredModel

from .config import BASE_REWRITING_INITS, OTHER_TUNERS, REFUSED_FIELDS


class _TunerConfig(DeferredModel):
    """The fields every PEFT tuner config here shares: a default rank, per-module patterns (regex ->
    rank or alpha) and the targets. Other fields are kept but do not matter here."""

    model_config = ConfigDict(extra="allow")
    lycoris: ClassVar[bool] = False  # a LoHa/LoKr config (`LycorisConfigFields`)?

    peft_type: str | None = Field(None, description="LORA (LOHA, LOKR, OFT, ... not yet)")
    r: int = Field(8, description="default rank")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="regex -> rank")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="regex -> alpha")
    target_modules: list[str] | str | None = None

    def _refused_field(self) -> str | None:
        """Why a field this config sets makes the adapter something other than per-module deltas."""
        return next((why for name, why in REFUSED_FIELDS.items() if getattr(self, name, None)), None)


class LoraConfigFields(_TunerConfig):
    """The `LoraConfig` fields that change the maths."""

    lora_alpha: float = Field(8, description="default alpha; scale = alpha / r (or / sqrt(r))")
    use_rslora: bool = Field(False, description="scale = alpha / sqrt(r)")
    use_dora: bool = Field(False, description="lora_magnitude_vector: weight-decomposed LoRA")
    lora_bias: bool = Field(False, description="lora_B.bias (not supported yet)")
    fan_in_fan_out: bool = Field(False, description="transposed weights (GPT-2 Conv1D; not supported)")
    init_lora_weights: bool | str = True

    def refusal(self) -> str | None:
        """Why this config cannot be converted as a plain set of deltas, or None."""
        if self.peft_type in OTHER_TUNERS:
            return OTHER_TUNERS[self.peft_type]
        if self.peft_type not in (None, "LORA"):
            return f"PEFT {self.peft_type} adapters are not supported yet"
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower().startswith(
            BASE_REWRITING_INITS
        ):
            return (
                f"init_lora_weights={self.init_lora_weights!r} rewrites the base weights; convert the "
                "adapter with PEFT's path_initial_model_for_weight_conversion first"
            )
        refused = self._refused_field()
        if refused:
            return refused
        for flag, what in (("lora_bias", "LoRA bias (lora_B.bias)"), ("fan_in_fan_out", "fan_in_fan_out")):
            if getattr(self, flag):
                return f"{what} is not supported yet"
        return None


class LycorisConfigFields(_TunerConfig):
    """The `LoHaConfig` / `LoKrConfig` fields (PEFT's `LycorisConfig`) that change the maths.

    Scale = alpha / r per module (patterns as in LoraConfig); no rsLoRA, no DoRA. PEFT rebuilds every
    module's factor shapes from these fields, so a writer must choose them to reproduce the tensors.
    """

    lycoris: ClassVar[bool] = True

    peft_type: str = Field(description="LOHA or LOKR")
    alpha: float = Field(8, description="default alpha; scale = alpha / r")
    use_effective_conv2d: bool = Field(False, description="Tucker cores on k x k convolutions")
    decompose_both: bool = Field(False, description="LoKr: lokr_w1 low-rank too (when r is small enough)")
    decompose_factor: int = Field(-1, description="LoKr: the factor of PEFT's factorization()")

    def refusal(self) -> str | None:
        return self._refused_field()
