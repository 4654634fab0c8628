"""What the tests build, each concept in one place (tests/ is on sys.path, so `from helpers.models import ...`).

models.py     safetensors checkpoints (the one writer), the tiny Llama, random transformers models, reading
              checkpoints back, byte snapshots of directory trees
adapters.py   PEFT adapters: written from tensors (the one writer) or made by PEFT on a base
plans.py      plan files and the command-line runner
reference.py  PEFT's merge as the reference: per tensor (float64, with rounding bounds) and at model level
quant.py      the float64 reference quantizers and quantized checkpoints
vlm.py        tiny vision-language models in the Hub's layout
moe.py        tiny mixture-of-experts configs
"""
