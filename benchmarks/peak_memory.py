"""Run one `maestro` command in this process and report the GPU's peak memory after it.

    python -m benchmarks.peak_memory bench step CONFIG [key=value ...] --json

The command prints what it prints; then one JSON line `{"peak_memory": {...}}` follows, in bytes, from
PyTorch's allocator (allocated: tensors; reserved: what the allocator holds from the driver). Used by
`make gpu-check` for `maestro bench step`, which measures throughput but not memory.
"""

from __future__ import annotations

import json
import sys

import torch

from maestro.cli import main as maestro_main


def main(argv: list[str] | None = None) -> int:
    rc = maestro_main(sys.argv[1:] if argv is None else argv)
    if torch.cuda.is_available():
        peak = {
            "allocated_bytes": torch.cuda.max_memory_allocated(),
            "reserved_bytes": torch.cuda.max_memory_reserved(),
        }
    else:
        peak = {}
    print(json.dumps({"peak_memory": peak}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
