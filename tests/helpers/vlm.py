"""Tiny vision-language models for the name-matching tests, built from transformers configs (nothing is
downloaded), saved in the Hub's layout, with PEFT adapters and PEFT's own merge as the reference.

The Hub layout differs from the module layout: LLaVA-family checkpoints keep `language_model.model.layers...`
and `vision_tower.vision_model.encoder...` where the loaded model has `model.language_model.layers...` and
`model.vision_tower.encoder...`; Qwen2-VL keeps `model.layers...` and `visual...`. save_pretrained writes it
by reverting the model's conversion mapping (models.build_base's hub_layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers import reference
from helpers.adapters import make_adapter
from helpers.models import build_base, quiet

_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)  # fmt: skip
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
               patch_size=8)  # fmt: skip
IMAGE_TOKEN = 127


@dataclass(frozen=True)
class TinyVLM:
    config: Callable[[], object]  # a transformers config
    lora_targets: list[str]  # language-model attention and vision-tower (and projector) modules
    inputs: Callable[[], dict]  # one image and text, for the logits check


def _llava_config():
    from transformers import LlavaConfig

    return LlavaConfig(text_config=dict(model_type="llama", **_TEXT),
                       vision_config=dict(model_type="clip_vision_model", projection_dim=32, **_VISION),
                       image_token_index=IMAGE_TOKEN)  # fmt: skip


def _gemma3_config():
    from transformers import Gemma3Config

    return Gemma3Config(text_config=dict(model_type="gemma3_text", sliding_window=8, **_TEXT),
                        vision_config=dict(model_type="siglip_vision_model", **_VISION), mm_tokens_per_image=4,
                        image_token_index=IMAGE_TOKEN, boi_token_index=125, eoi_token_index=126)  # fmt: skip


def _qwen2_vl_config():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(model_type="qwen2_vl_text", rope_parameters=dict(rope_type="default", mrope_section=[2, 1, 1]),
                         **_TEXT),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=IMAGE_TOKEN, vision_start_token_id=125, video_token_id=126)  # fmt: skip


def _paligemma_config():
    from transformers import PaliGemmaConfig

    return PaliGemmaConfig(text_config=dict(model_type="gemma", **_TEXT),
                           vision_config=dict(model_type="siglip_vision_model", projection_dim=32, **_VISION),
                           image_token_index=IMAGE_TOKEN, projection_dim=32, hidden_size=32)  # fmt: skip


def _mistral3_config():
    from transformers import Mistral3Config

    return Mistral3Config(text_config=dict(model_type="mistral", **_TEXT),
                          vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4,
                                             head_dim=8),
                          image_token_index=IMAGE_TOKEN, spatial_merge_size=2)  # fmt: skip


def _token_ids(n_image: int, before: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    text = torch.randint(3, 120, (10,), generator=g).tolist()
    return torch.tensor([[1, *before, *[IMAGE_TOKEN] * n_image, *text]])


def _pixels(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(99))


def _square_image_inputs(n_tokens: int) -> Callable[[], dict]:
    return lambda: {"input_ids": _token_ids(n_tokens), "pixel_values": _pixels(1, 3, 16, 16)}


def _mistral3_inputs() -> dict:
    # a 16x16 image: 4x4 patches of 4 pixels, merged 2x2 into 4 image tokens
    return {"input_ids": _token_ids(4), "pixel_values": _pixels(1, 3, 16, 16), "image_sizes": torch.tensor([[16, 16]])}


def _qwen2_vl_inputs() -> dict:
    # an 8x8 image: a 2x2 grid of 4x4 patches (x2 frames), merged 2x2 into one image token
    ids = _token_ids(1, before=(125,))
    return {"input_ids": ids, "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
            "pixel_values": _pixels(4, 3 * 2 * 4 * 4), "image_grid_thw": torch.tensor([[1, 2, 2]])}  # fmt: skip


TINY_VLMS = {
    # CLIP tower: 2x2 patches -> 4 image tokens (the class token is dropped)
    "llava": TinyVLM(_llava_config, ["q_proj", "v_proj", "linear_1"], _square_image_inputs(4)),
    "qwen2_vl": TinyVLM(_qwen2_vl_config, ["q_proj", "v_proj", "qkv"], _qwen2_vl_inputs),
    # SigLIP tower, tied embeddings
    "gemma3": TinyVLM(_gemma3_config, ["q_proj", "v_proj", "out_proj"], _square_image_inputs(4)),
    "paligemma": TinyVLM(_paligemma_config, ["q_proj", "v_proj", "out_proj"], _square_image_inputs(4)),
    "mistral3": TinyVLM(_mistral3_config, ["q_proj", "v_proj", "linear_1"], _mistral3_inputs),
}


def load_vlm(path: str | Path, dtype: torch.dtype):
    quiet()
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype).eval()


def build_vlm(out_dir: str | Path, family: str, dtype: torch.dtype, *, seed: int = 0) -> Path:
    """A tiny random VLM saved in three or more shards in the Hub's layout; returns its directory."""
    from transformers import AutoModelForImageTextToText

    config = TINY_VLMS[family].config()
    return build_base(out_dir, config, dtype, seed=seed, auto_class=AutoModelForImageTextToText, hub_layout=True,
                      min_shards=3)  # fmt: skip


def make_vlm_adapter(base_dir: Path, adapter_dir: Path, family: str, dtype: torch.dtype, seed: int = 1) -> Path:
    """A LoRA adapter (r=8, alpha=16, every LoRA tensor ~ N(0, 0.1^2)) on the family's targets, saved by PEFT."""
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TINY_VLMS[family].lora_targets)
    return make_adapter(base_dir, adapter_dir, lora, dtype=dtype, seed=seed, auto_class=AutoModelForImageTextToText)


def logits(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**TINY_VLMS[family].inputs()).logits.float()


@dataclass
class VLMReference:
    """PEFT's merge of one adapter into a VLM, in module names."""

    state: dict[str, torch.Tensor]  # merge_and_unload()'s parameters
    lora_weights: set[str]  # module names of the weights a LoRA layer changes
    logits: torch.Tensor
    base_state: dict[str, torch.Tensor]
    base_logits: torch.Tensor


def peft_vlm_reference(base_dir: Path, adapter_dir: Path, family: str, dtype: torch.dtype) -> VLMReference:
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForImageTextToText

    base = load_vlm(base_dir, dtype)
    peft_model = reference.peft_model(base_dir, [adapter_dir], AutoModelForImageTextToText, dtype)
    lora = {name.removeprefix("base_model.model.") + ".weight"
            for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}  # fmt: skip
    merged = peft_model.merge_and_unload().eval()
    return VLMReference(
        dict(merged.state_dict()), lora, logits(merged, family), base.state_dict(), logits(base, family)
    )
