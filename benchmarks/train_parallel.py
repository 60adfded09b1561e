"""Multi-process training benchmark: data parallel (DDP) against fully sharded (`--shard fsdp`).

Runs `python -m assistant train` under torchrun with N processes, once per mode, on the real default
model (Gemma 3 270M + the shipped vision tower), the report task's LoRA stage, and reads each run's
metadata: seconds per optimizer step, samples per second, weights held per process, peak memory
(resident RAM on CPU, allocated GPU memory on GPUs), the held-out loss. It also compares the two
adapters, which should agree up to bf16 rounding (the same arithmetic, sharded or not).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_parallel.py [--processes 2] [--steps 6]

On a machine without GPUs the processes run on the CPUs over gloo (OMP_NUM_THREADS threads each);
with GPUs, one per process over NCCL. Writes benchmarks/results/train-parallel.json; the load
average is recorded because the machine may be shared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODES = {"ddp": [], "fsdp": ["--shard", "fsdp"]}


def train(mode: str, folder: Path, args: argparse.Namespace) -> dict:
    """One torchrun training run; its metadata's training record plus the command's wall time."""
    out = folder / mode
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
               "-m", "assistant", "train", "--stage", "lora", "--task", "report", "--out", str(out),
               "--work-dir", str(folder / f"work-{mode}"), "--max-steps", str(args.steps),
               "--set", f"train.batch_size={args.batch}", "--set", "train.grad_accum=1",
               "--set", f"train.val_examples={args.val_examples}", "--set", "train.checkpoint_every=100000",
               *MODES[mode]]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    training = json.loads((out / "metadata.json").read_text())["training"]
    keep = ("steps", "processes", "sharded", "samples", "seconds", "s_per_step", "samples_per_s", "peak_rss_mb",
            "weights_mb_per_process", "held_out_loss_full_vocab", "machine")
    return {"mode": mode, "wall_s": round(time.perf_counter() - start, 1), **{k: training.get(k) for k in keep}}


def adapter_difference(folder: Path) -> dict:
    """Largest absolute difference between the two runs' saved tensors, beside their largest value."""
    from safetensors.torch import load_file

    def tensors(mode: str) -> dict:
        return {**load_file(folder / mode / "adapter_model.safetensors"),
                **load_file(folder / mode / "projector.safetensors")}

    ddp, fsdp = tensors("ddp"), tensors("fsdp")
    worst = max(float((ddp[k].float() - fsdp[k].float()).abs().max()) for k in ddp)
    return {"tensors": len(ddp), "max_abs_difference": worst,
            "max_abs_value": max(float(v.float().abs().max()) for v in ddp.values()),
            "dtype": str(next(iter(ddp.values())).dtype).removeprefix("torch.")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=2, help="examples per process and step")
    parser.add_argument("--val-examples", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "train-parallel.json"))
    args = parser.parse_args(argv)
    before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="train-parallel-") as tmp:
        runs = [train(mode, Path(tmp), args) for mode in MODES]
        difference = adapter_difference(Path(tmp))
    import torch

    result = {"benchmark": "train_parallel", "runs": runs, "adapter_difference": difference,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/train_parallel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"arch": platform.machine(), "cpu_count": os.cpu_count(),
                          "gpus": torch.cuda.device_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                          "torch": torch.__version__, "loadavg_before": list(before),
                          "loadavg_after": list(os.getloadavg())}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
