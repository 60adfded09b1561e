"""`python -m assistant export-adapter`: a trained adapter in a form serving engines load;
`python -m assistant build-shortlist`: the output-vocabulary shortlist fast decoding drafts over.

`--format peft` writes the LoRA for vLLM (`--enable-lora --lora-modules NAME=DIR`) next to a note
of the base model folder to serve; `--format merged-gguf` merges it into the base GGUF for
llama.cpp's server (`python -m llama_cpp.server --model DIR/NAME-merged-f16.gguf`).
Either way the assistant then reaches it with `--llm-backend openai --base-url URL`.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_commands(commands) -> None:
    from .cli import add_model_options  # imported here: cli imports this module to register it

    export = commands.add_parser("export-adapter", help="write an adapter for a serving engine "
                                 "(peft LoRA for vLLM, or merged into a GGUF for llama.cpp)")
    export.add_argument("--format", required=True, choices=("peft", "merged-gguf"), dest="export_format")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write into (created)")
    export.add_argument("--gguf-type", choices=("f16", "q8_0"), default="f16",
                        help="type of the rewritten tensors in a merged GGUF (default f16: closest to "
                             "the local model; q8_0 is half the size)")
    export.add_argument("--base-gguf", default=None, metavar="FILE",
                        help="the base model's GGUF (default: the built-in LLM's packaged GGUF)")
    add_model_options(export)  # --adapter (required here), --llm, --config, --set
    export.set_defaults(handler=run_export)

    shortlist = commands.add_parser("build-shortlist", help="the token ids our training text uses: fast greedy "
                                    "decoding drafts over them and checks every draft against the whole vocabulary")
    shortlist.add_argument("--out", default="adapters/vocab-shortlist", metavar="DIR", help="folder to write")
    shortlist.add_argument("--llm", default=None, help="local HF model folder (default: the built-in LLM)")
    shortlist.add_argument("--debug", action="store_true", help="show full tracebacks")
    shortlist.set_defaults(handler=run_build_shortlist)


def run_export(args) -> int:
    from .cli import config_from_args

    if not args.adapter:
        raise ValueError("name the adapter to export with --adapter, e.g. --adapter adapters/report-lora")
    config = config_from_args(args)
    out = Path(args.out)
    if args.export_format == "peft":
        return _export_peft(config, out)
    from .serve_export import export_merged_gguf

    target = export_merged_gguf(config, out, args.gguf_type, Path(args.base_gguf) if args.base_gguf else None)
    print(f"merged GGUF written: {target} ({target.stat().st_size / 1e6:.0f} MB)")
    print(f"serve it: python -m llama_cpp.server --model {target} --host 127.0.0.1 --port 8080 --n_ctx 2048")
    return 0


def _export_peft(config, out: Path) -> int:
    from .base_models import resolve_llm_dir
    from .model import resolve_adapter
    from .serve_export import export_peft

    adapter = resolve_adapter(config)
    if adapter is None or not adapter.is_dir():
        raise ValueError(f"--adapter {config.adapter!r} is not an adapter folder")
    hf_folder = resolve_llm_dir(config.llm.path)  # vLLM serves this folder as the base
    modules = export_peft(adapter, out, {"llm": config.llm.path, "hf_folder": str(hf_folder)})
    rank = json.loads((out / "adapter_config.json").read_text())["r"]
    print(f"LoRA on {len(modules)} modules written to {out}")
    print(f"serve it: vllm serve {hf_folder} --enable-lora --max-lora-rank {rank} "
          f"--lora-modules {adapter.name}={out.resolve()}")
    print(f"then: --llm-backend openai --base-url http://127.0.0.1:8000/v1 --served-model {adapter.name}"
          f" (or for one task only: --set backend.task_models.TASK={adapter.name})")
    return 0


def run_build_shortlist(args) -> int:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from .base_models import resolve_llm_dir
    from .config import DEFAULT_LLM
    from .fast_generate import eos_token_ids
    from .vocab_shortlist import build, save

    folder = resolve_llm_dir(args.llm or DEFAULT_LLM)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = AutoConfig.from_pretrained(str(folder))
    vocab_size = getattr(config.get_text_config(), "vocab_size", None) or len(tokenizer)
    eos = GenerationConfig.from_pretrained(str(folder)).eos_token_id if (folder / "generation_config.json").is_file() \
        else tokenizer.eos_token_id
    ids, meta = build(tokenizer, vocab_size, eos_token_ids(eos))
    meta["llm"] = args.llm or DEFAULT_LLM
    save(Path(args.out), ids, meta)
    coverage = meta["held_out_coverage"]
    print(f"{meta['tokens']} of {vocab_size} tokens written to {args.out}; held-out target tokens in it: "
          f"{coverage['in_shortlist']}/{coverage['target_tokens']} ({coverage['fraction']:.2%})")
    return 0
