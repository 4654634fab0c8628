"""Which way round a square 2-D weight is stored: (out, in) like nn.Linear, or (in, out) like transformers'
Conv1D. Both fit a LoRA pair's shapes, so the model's architecture decides, read from config.json alone.
"""

from __future__ import annotations

import functools

from .modelsource import auto_mappings, package_root

# Architectures whose linear layers are transformers' Conv1D, stored (in, out).
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")


def stores_in_out(config: dict, tensor: str, fan_in_fan_out: bool) -> bool:
    """Whether a square 2-D weight is stored (in, out), as transformers' Conv1D stores it. Decided by the
    (sub-)model the tensor belongs to, not by squareness: a composite model (VisionEncoderDecoder,
    EncoderDecoder) nests each sub-model's config under the name its modules live under (`decoder.`); a
    known architecture decides; remote code or an unknown model_type leaves it to the adapter's
    fan_in_fan_out (which PEFT sets true itself when it finds a Conv1D)."""
    sub = config
    for part in tensor.split(".")[:-1]:
        nested = sub.get(part)
        if isinstance(nested, dict) and "model_type" in nested:
            sub = nested
    model_type = sub.get("model_type")
    if model_type in _CONV1D_MODEL_TYPES:
        return True
    if not model_type or config.get("auto_map") or sub.get("auto_map") or not _known_model_type(model_type):
        return fan_in_fan_out
    return False


def _known_model_type(model_type: str) -> bool:
    """Whether transformers (when installed) builds this model_type itself; without it, the config is trusted."""
    known = _transformers_model_types()
    return known is None or model_type in known


@functools.cache
def _transformers_model_types() -> frozenset[str] | None:
    """The model types transformers has a config class for (None: it is not installed), from its data-only
    auto mappings (modelsource: importing the package would add ~35 MiB to a process that max_memory bounds,
    and seconds to its start)."""
    mappings = auto_mappings()
    if mappings is not None:
        return frozenset(mappings.CONFIG_MAPPING_NAMES)
    if package_root() is None:
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # older releases: no data module

    return frozenset(CONFIG_MAPPING_NAMES)
