"""What sd-scripts' metadata says, summarised: base model, network, training settings, trigger words.

sd-scripts writes `ss_*` entries (train_network.py) and SAI ModelSpec `modelspec.*` entries
(library/sai_model_spec.py); both are read here because sd-scripts is where most files with them
come from. Values are strings; sd-scripts writes "None" for unset options, which is left out.
"""

from __future__ import annotations

import json
from collections import Counter

#: Entries shown as they are, in this order.
SHOWN = (
    "ss_base_model_version",
    "modelspec.architecture",
    "modelspec.title",
    "modelspec.author",
    "modelspec.date",
    "modelspec.usage_hint",
    "ss_sd_model_name",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_output_name",
    "ss_num_train_images",
    "ss_num_epochs",
    "ss_max_train_steps",
    "ss_total_batch_size",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_lr_scheduler",
    "ss_optimizer",
    "ss_resolution",
    "ss_mixed_precision",
    "ss_clip_skip",
    "ss_noise_offset",
    "ss_seed",
    "ss_training_comment",
)
#: The entries that name the base model (checked against the families' aliases by detection).
BASE_MODEL_KEYS = ("ss_base_model_version", "modelspec.architecture")
TOP_TAGS = 5


def describe(metadata: dict[str, str]) -> dict[str, str]:
    summary = {key: metadata[key] for key in SHOWN if metadata.get(key, "None") not in ("None", "")}
    if "ss_base_model_version" not in summary and metadata.get("ss_v2") in ("True", "False"):
        summary["ss_v2"] = metadata["ss_v2"]  # files from before ss_base_model_version existed
    words = trigger_words(metadata)
    if words:
        summary["trigger_words"] = words
    return summary


def trigger_words(metadata: dict[str, str]) -> str:
    """ModelSpec's trigger phrase if the trainer set one, else the most frequent training tags."""
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        return phrase
    try:
        folders = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except (ValueError, RecursionError):  # not JSON, absurd numbers, nesting bombs: no trigger words
        return ""
    counts: Counter[str] = Counter()
    if isinstance(folders, dict):
        for tags in folders.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, int):
                        counts[tag.strip()] += count
    return ", ".join(tag for tag, _ in counts.most_common(TOP_TAGS) if tag)
