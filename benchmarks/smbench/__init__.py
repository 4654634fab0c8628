"""The shardmerge benchmark harness behind `benchmarks/bench.py`.

common     paths, units, formatting, the tools' environment
synthetic  synthetic Llama-shaped models and adapters (one shard in memory at a time, or streamed tensor by tensor)
measure    the measuring wrapper process, typed measurements, rounds of jobs and their summaries
tools      the commands measured (copy floor, start-up, shardmerge, torchrun, PEFT, mergekit) and output checks
report     tables, machine and version facts, RESULTS.md sections
modes/     one module per `bench.py MODE`; adding a mode is adding a module there (see modes/__init__.py)
"""
