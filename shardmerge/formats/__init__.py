"""Quantized base checkpoints: which format a base is in, and its codec (one class per format).

The format comes from config.json's `quantization_config` (ModelOpt: also `hf_quant_config.json`);
formats we cannot requantize faithfully are refused by name rather than merged wrongly.
"""

from __future__ import annotations

from ..errors import ShardmergeError
from .base import Codec, Quantized
from .fp4 import MXFP4, CompressedNVFP4, ModelOptNVFP4
from .fp8 import BlockFP8, CompressedFP8, FbgemmFP8

# Packed-integer and codebook formats: their codes cannot be rewritten from a merged float tile here.
_REFUSED = {
    "gptq": "GPTQ (packed int4/int8)", "awq": "AWQ (packed int4)", "bitsandbytes": "bitsandbytes (nf4/int8)",
    "aqlm": "AQLM (codebooks)", "vptq": "VPTQ (codebooks)", "hqq": "HQQ", "eetq": "EETQ (int8)",
    "quanto": "quanto", "torchao": "torchao", "gguf": "GGUF", "bitnet": "BitNet (ternary)", "spqr": "SpQR",
    "higgs": "HIGGS", "fp_quant": "FP-Quant", "auto-round": "AutoRound (packed int)", "quark": "Quark",
}  # fmt: skip

_CODECS: dict[str, type[Codec]] = {"fp8": BlockFP8, "fbgemm_fp8": FbgemmFP8, "mxfp4": MXFP4}

__all__ = ["Codec", "Quantized", "detect"]


def detect(config: dict, directory) -> Codec | None:
    """The base's codec, or None for a float checkpoint; one line naming the format if it is refused."""
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ShardmergeError(f"{directory / 'config.json'}: quantization_config is not a JSON object")
    modelopt = _modelopt_file(directory)
    if qc is None and modelopt is None:
        return None
    if qc is None or qc.get("quant_method") == "modelopt":
        return _modelopt(qc or {}, modelopt or {}, directory)
    method = str(qc.get("quant_method", "")).lower()
    where = f"{directory}: the base is quantized with"
    if method in _REFUSED:
        raise ShardmergeError(
            f"{where} {_REFUSED[method]}, which shardmerge cannot merge into; merge into the "
            "unquantized base model instead"
        )
    if method in _CODECS:
        return _configured(_CODECS[method], qc, directory)
    if method == "compressed-tensors":
        return _compressed(qc, where, directory)
    raise ShardmergeError(
        f"{where} an unknown quant_method {qc.get('quant_method')!r}; shardmerge merges into "
        "fp8, fbgemm_fp8, mxfp4, compressed-tensors (FP8, NVFP4) and modelopt NVFP4 bases"
    )


def _configured(codec: type[Codec], qc: dict, directory) -> Codec:
    """The codec its quantization_config describes; a field it cannot take is named with config.json."""
    try:
        return codec(qc)
    except ShardmergeError as e:
        raise ShardmergeError(f"{directory / 'config.json'}: quantization_config {e}") from None


def _compressed(qc: dict, where: str, directory) -> Codec:
    fmt = qc.get("format")
    groups = {k: g for k, g in (qc.get("config_groups") or {}).items() if isinstance(g, dict)}
    formats = ({fmt} if fmt else set()) | {g.get("format") for g in groups.values()} - {None}
    for name, group in groups.items():
        # compressed-tensors dequantizes (code - zero_point) * scale; the codecs here have no zero point.
        if ((group.get("weights") or {}).get("symmetric", True)) is not True:
            raise ShardmergeError(
                f"{where} asymmetric compressed-tensors weights (config_groups.{name}.weights.symmetric is not "
                "true: codes carry a weight_zero_point), which shardmerge cannot merge into; merge into the "
                "unquantized base model instead"
            )
    if formats == {"float-quantized"} or formats == {"naive-quantized"} and _all_float8(qc):
        return _configured(CompressedFP8, qc, directory)
    if formats == {"nvfp4-pack-quantized"}:
        return CompressedNVFP4(qc.get("ignore"))
    raise ShardmergeError(
        f"{where} compressed-tensors format {', '.join(sorted(map(str, formats))) or '(none)'}, "
        "which shardmerge cannot merge into (float-quantized FP8 and nvfp4-pack-quantized are "
        "supported)"
    )


def _all_float8(qc: dict) -> bool:
    groups = (qc.get("config_groups") or {}).values()
    return bool(groups) and all(((g or {}).get("weights") or {}).get("type") == "float" for g in groups)


def _modelopt_file(directory) -> dict | None:
    from ..sources import _json_file
    from ..stores import store_for

    path = directory / "hf_quant_config.json"
    if store_for(path).stat(path) is None:
        return None
    value = _json_file(path, "ModelOpt quantization config")
    quantization = value.get("quantization", value)
    if not isinstance(quantization, dict):
        raise ShardmergeError(f"{path}: 'quantization' is not a JSON object")
    return quantization


def _modelopt(qc: dict, file: dict, directory) -> Codec:
    algo = str(qc.get("quant_algo") or file.get("quant_algo") or "").upper()
    if algo != "NVFP4":
        raise ShardmergeError(
            f"{directory}: the base is quantized with ModelOpt {algo or '(no quant_algo)'}, "
            "which shardmerge cannot merge into (ModelOpt NVFP4 is supported)"
        )
    return ModelOptNVFP4(qc.get("exclude_modules") or file.get("exclude_modules"))
