"""Training-step benchmark: seconds per LoRA step of the real model under each loss and dtype.

The tied 262,144 x 640 output matrix is two thirds of Gemma 3 270M's weights, so where logits are
computed decides the cost of a step on a CPU:
  all_positions  transformers' own loss (logits at every position, prompt included)
  target_full    logits only where a target token is predicted, full vocabulary
  target_domain  logits only there, over the training targets' tokens + 4,096 sampled others
Each is timed on the same real IU X-ray batch (report task, text-only) after one warm-up step.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step.py [--batch 4] [--dtypes bfloat16 float32]

Writes benchmarks/results/train-step.json. The machine is shared: the load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, installed or not

import torch  # noqa: E402

from assistant.config import AssistantConfig  # noqa: E402
from assistant.model import ClinicalVLM  # noqa: E402
from assistant.train import LLMTrainSettings, make_datasets, prepare_model, target_loss  # noqa: E402
from assistant.train_data import collate, report_examples, target_vocabulary  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def time_mode(vlm, batch, mode: str, vocab, repeats: int) -> list[float]:
    def step():
        if mode == "all_positions":
            loss = vlm.hf(**batch).loss
        else:
            loss = target_loss(vlm.hf, batch, vocab if mode == "target_domain" else None, 4096)
        loss.backward()
        vlm.hf.zero_grad(set_to_none=True)

    step()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return seconds


def run(dtype: str, batch_size: int, repeats: int, lora_layers: int | None) -> list[dict]:
    config = AssistantConfig().override({"adapter": None, "llm.dtype": dtype, "llm.lora_layers": lora_layers})
    settings = LLMTrainSettings(train_dtype=dtype)
    vlm = prepare_model(config, settings, ClinicalVLM.from_config(config, progress=False))
    vlm.hf.train()
    examples = report_examples("train")
    train, _ = make_datasets(vlm, settings, examples, [])
    batch = collate([train[i] for i in range(batch_size)], vlm.tokenizer.pad_token_id)
    tokens = int(batch["attention_mask"].sum())
    vocab = target_vocabulary(train)
    rows = []
    for mode in ("all_positions", "target_full", "target_domain"):
        seconds = time_mode(vlm, batch, mode, vocab, repeats)
        median = statistics.median(seconds)
        rows.append({"dtype": dtype, "mode": mode, "batch": batch_size, "tokens": tokens, "lora_layers": lora_layers,
                     "s_per_step": round(median, 3), "s_per_example": round(median / batch_size, 3),
                     "all_s": [round(s, 3) for s in seconds]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--lora-layers", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "train-step.json"))
    args = parser.parse_args(argv)
    before = os.getloadavg()
    rows = [row for dtype in args.dtypes for row in run(dtype, args.batch, args.repeats, args.lora_layers)]
    result = {"benchmark": "train_step", "rows": rows,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"arch": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
                          "loadavg_before": list(before), "loadavg_after": list(os.getloadavg())},
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
