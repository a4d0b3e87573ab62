#!/bin/sh
# The CPU run behind docs/speed.md, split into three invocations (each ~20–35 min on a shared 2-core machine).
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/speed-results
$PY benchmarks/adapter_speed.py --tokens 512 --checkpointing off --warmup 1 --no-memory --no-quant4 \
    --json $OUT/t512_off.json --markdown $OUT/t512_off.md
$PY benchmarks/adapter_speed.py --tokens 2048 --checkpointing off --warmup 1 \
    --methods lora-r8,ssh,lfma,fourierft,waveft,shira \
    --memory-methods lora-r8,ssh,lfma,fourierft,waveft,shira,peft-fourierft --no-quant4 \
    --json $OUT/t2048_off.json --markdown $OUT/t2048_off.md
$PY benchmarks/adapter_speed.py --tokens 512 --checkpointing on --warmup 1 \
    --methods lora-r8,ssh,fourierft,waveft,shira,peft-fourierft \
    --memory-methods lora-r8,ssh,waveft,shira --quant4-methods lora-r8,ssh,waveft,shira,peft-fourierft \
    --json $OUT/t512_on_4bit.json --markdown $OUT/t512_on_4bit.md
