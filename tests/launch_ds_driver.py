"""Run several recipes one after another inside the same DeepSpeed ranks (saves one launcher start per recipe).

    deepspeed --num_gpus 2 tests/launch_ds_driver.py A.yaml B.yaml ...

Exit status: the first non-zero status of launch.train, else 0. Between runs the accelerate/transformers DeepSpeed
state is reset, as a fresh process would have it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from launch import train

    recipes = [a for a in argv if not a.startswith("--local_rank")]
    for recipe in recipes:
        code = train.main([recipe])
        print(f"driver: {recipe} exited with {code}", flush=True)
        if code != 0:
            return code
        AcceleratorState._reset_state(reset_partial_state=False)
        unset_hf_deepspeed_config()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
