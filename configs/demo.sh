#!/usr/bin/env bash
# `make demo`: the main job on the embedded default. Writes a small synthetic TreeSatAI-TS-like
# archive (once), pretrains the tiny preset on 2 local Ray workers with ZeRO-2 (the GPUs when there
# are any, CPU otherwise), then shows where the logs and checkpoints are and the loss going down.
# Needs no network.
set -euo pipefail
venv=${1:-.venv}
export PATH="$(cd "$venv/bin" && pwd):$PATH"
shards=.demo/shards
if [ ! -f "$shards/train/manifest.json" ]; then
    maestro shards synth "$shards" --preset treesatai_ts --samples 256 --seed 0 --max-dates 6 \
        --shard-samples 16 --no-progress
fi
name="demo-$(date +%Y%m%d-%H%M%S)"
maestro info configs/demo.yaml
maestro pretrain configs/demo.yaml "run.name=$name"
run=".demo/runs/$name"
python - "$run" <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run = sys.argv[1]
acc = EventAccumulator(f"{run}/tensorboard", size_guidance={"scalars": 0}).Reload()
loss = acc.Scalars("train/loss")
print("\nloss by step:")
for e in loss:
    print(f"  step {e.step:>4}  {e.value:.4f}  " + "#" * round(40 * e.value / loss[0].value))
print(f"\nloss {loss[0].value:.4f} at step {loss[0].step} -> {loss[-1].value:.4f} at step {loss[-1].step}")
print(f"TensorBoard logs: {run}/tensorboard   (tensorboard --logdir {run}/tensorboard)")
print(f"checkpoints:      {run}/checkpoint_*  (resume: maestro pretrain configs/demo.yaml run.name={run.split('/')[-1]})")
PY
