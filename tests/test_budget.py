"""The budget arithmetic: for any model, adapter and max_memory, the buffers the planner fixes fit max_memory,
every tile fits its buffers, or the plan is refused with a budget that does work.

Inputs are written as headers over sparse files (the planner reads headers only), so an example costs
milliseconds whatever its shapes.
"""

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardmerge.config import load_plan
from shardmerge.errors import ShardmergeError
from shardmerge.planner import build_plan
from shardmerge.safetensors_io import DTYPE_SIZES, encode_header
from shardmerge.units import MiB, parse_size

PEFT = "base_model.model."


def write_sparse(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A safetensors file with these (dtype, shape) entries and a hole for data."""
    entries = [(n, d, s, math.prod(s) * DTYPE_SIZES[d]) for n, (d, s) in tensors.items()]
    header, _ = encode_header(entries, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(e[3] for e in entries))


layer = st.fixed_dictionaries({
    "rows": st.integers(1, 3000), "cols": st.integers(1, 3000), "rank": st.integers(1, 64),
    "kind": st.sampled_from(["lora", "dora", "bias", "tokens", "untouched"]),
})  # fmt: skip


@st.composite
def cases(draw):
    layers = draw(st.lists(layer, min_size=1, max_size=4))
    dtype = draw(st.sampled_from(["BF16", "F16", "F32"]))
    out = draw(st.sampled_from(["keep", "bfloat16", "float32"]))
    budget = draw(st.integers(4 * MiB, 72 * MiB))  # the run's own overhead is 8 MiB
    device = draw(st.sampled_from(["cpu", "cuda:0"]))
    return layers, dtype, out, budget, device


def write_case(root: Path, layers: list[dict], dtype: str) -> tuple[Path, Path]:
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    tensors, lora, config = {}, {}, {"peft_type": "LORA", "r": 64, "lora_alpha": 16, "rank_pattern": {}}
    for i, spec in enumerate(layers):
        name, (rows, cols, r) = f"layers.{i}.proj", (spec["rows"], spec["cols"], spec["rank"])
        tensors[f"{name}.weight"] = (dtype, (rows, cols))
        tensors[f"{name}.bias"] = (dtype, (rows,))
        if spec["kind"] in ("lora", "dora", "bias"):
            lora[f"{PEFT}{name}.lora_A.weight"] = ("F32", (r, cols))
            lora[f"{PEFT}{name}.lora_B.weight"] = ("F32", (rows, r))
            config["rank_pattern"][rf"layers\.{i}\.proj"] = r
        if spec["kind"] == "dora":
            lora[f"{PEFT}{name}.lora_magnitude_vector"] = ("F32", (rows,))
        if spec["kind"] == "bias":
            lora[f"{PEFT}{name}.lora_B.bias"] = ("F32", (rows,))
        if spec["kind"] == "tokens":
            ids = sorted({(7 * k) % rows for k in range(min(rows, 5))})
            lora[f"{PEFT}{name}.token_adapter.trainable_tokens_delta"] = ("F32", (len(ids), cols))
            config.setdefault("trainable_token_indices", {})[rf"layers\.{i}\.proj"] = ids
    if not lora:  # an adapter must hold something: a LoRA on the first layer
        spec = layers[0]
        lora[f"{PEFT}layers.0.proj.lora_A.weight"] = ("F32", (1, spec["cols"]))
        lora[f"{PEFT}layers.0.proj.lora_B.weight"] = ("F32", (spec["rows"], 1))
        config["rank_pattern"][r"layers\.0\.proj"] = 1
    write_sparse(base / "model.safetensors", tensors)
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write_sparse(adapter / "adapter_model.safetensors", lora)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


def plan_for(root: Path, base: Path, adapter: Path, out: str, budget: int, device: str):
    plan = load_plan(
        {"base": str(base), "adapters": [str(adapter)], "output": str(root / "out"), "dtype": out, "max_memory": budget}
    )
    return build_plan(plan, root / "scratch", device)


def check_fits(merge_plan, budget: int, on_cuda: bool) -> None:
    buffers = merge_plan.buffers
    gpu_work = 4 * buffers.work_elems * buffers.work_factor if on_cuda else 0  # on the device, not in max_memory
    assert buffers.total - gpu_work <= budget
    for task in (t for s in merge_plan.shards for t in s.tasks if not t.is_copy and t.out_nbytes):
        row = task.source.numel // task.source.shape[0]
        widest = max(DTYPE_SIZES[task.source.dtype], DTYPE_SIZES[task.out_dtype])
        assert 1 <= task.chunk_rows <= task.rows_per_tile <= task.source.shape[0]
        assert task.rows_per_tile * row * widest <= buffers.slab_bytes, task.name
        assert task.chunk_rows * row <= buffers.work_elems, task.name
        if task.rows_per_tile < task.source.shape[0] and task.chunk_rows < task.rows_per_tile:
            assert task.rows_per_tile % task.chunk_rows == 0, task.name  # same chunks whatever the budget
    factors = max(
        (sum(t.fixed_bytes for t in task.terms) for s in merge_plan.shards for task in s.tasks if task.terms), default=0
    )
    assert buffers.factor_bytes >= 2 * factors  # this task's factors and the next one's


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_planned_buffers_fit_max_memory_or_the_refusal_names_a_budget_that_fits(case):
    layers, dtype, out, budget, device = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter = write_case(root, layers, dtype)
        for _ in range(3):  # a refusal for the run's overhead may be followed by one for a tensor's rows
            try:
                merge_plan = plan_for(root, base, adapter, out, budget, device)
                break
            except ShardmergeError as e:
                match = re.fullmatch(r"max_memory \S+ is too small.*max_memory to at least (\S+)", str(e))
                assert match, str(e)
                suggested = parse_size(match.group(1), "suggested")
                assert suggested > budget
                budget = suggested
        else:
            pytest.fail(f"three refusals in a row, the last for {budget} bytes")
        check_fits(merge_plan, budget, device.startswith("cuda"))


def test_a_tiny_budget_is_refused_naming_the_tensor_and_a_budget(tmp_path):
    base, adapter = write_case(tmp_path, [{"rows": 64, "cols": 2**20, "rank": 8, "kind": "lora"}], "BF16")
    with pytest.raises(
        ShardmergeError,
        match=r"max_memory 17\.0MiB is too small for tensor 'layers\.0\.proj\.weight': "
        r"one row block needs .* raise max_memory to at least ",
    ):
        plan_for(tmp_path, base, adapter, "keep", 17 * MiB, "cpu")
