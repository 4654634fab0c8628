"""Convolutions (1x1, kxk, Conv1d), with and without DoRA, against PEFT's merge_and_unload on a plain module."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import shardmerge


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.k3 = nn.Conv2d(4, 8, 3)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.temporal = nn.Conv1d(8, 6, 3)
        self.head = nn.Linear(6, 5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv_merges_match_peft(tmp_path, use_dora):
    torch.manual_seed(0)
    model = ConvNet()
    (tmp_path / "base").mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "base/model.safetensors"),
        metadata={"format": "pt"},
    )
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, use_dora=use_dora, target_modules=["k3", "pointwise", "temporal", "head"])
    )
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            nn.init.normal_(param, std=0.3)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reference = peft_model.merge_and_unload().state_dict()

    shardmerge.merge(
        {
            "base": str(tmp_path / "base"),
            "adapters": [str(tmp_path / "adapter")],
            "output": str(tmp_path / "out"),
            "max_memory": "17MiB",
        }
    )
    merged = load_file(str(tmp_path / "out/model.safetensors"))
    base = load_file(str(tmp_path / "base/model.safetensors"))
    assert merged.keys() == reference.keys()
    for name, expected in reference.items():
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)
        if name.endswith("weight"):  # every weight was adapted: the merge must have changed it
            assert not torch.equal(merged[name], base[name]), name


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(8, 8, 3, groups=4)


def test_lora_on_a_grouped_convolution_is_refused_naming_the_groups_as_peft_refuses_to_merge_it(tmp_path):
    torch.manual_seed(0)
    model = GroupedConvNet()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base/model.safetensors"))
    with pytest.warns(UserWarning, match="groups > 1"):
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["depthwise"]))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(NotImplementedError):
        peft_model.merge_and_unload()
    plan = {"base": str(tmp_path / "base"), "adapters": [str(tmp_path / "adapter")], "output": str(tmp_path / "out")}
    with pytest.raises(shardmerge.ShardmergeError, match=r"'depthwise' is a convolution with groups=4 .*cannot merge"):
        shardmerge.merge(plan)
    assert not (tmp_path / "out").exists()
