"""The LoRA adapter of an ELMM in PEFT's own format, for ``PeftModel.from_pretrained``.

The project injects PEFT LoRA layers into the ELMM (:func:`elmm_ray.models.lora.apply_lora`),
so its tensors are named ``backbone.<path>.lora_A.default.weight``. A PEFT adapter of the
Llava backbone names the same tensor ``base_model.model.<path>.lora_A.weight`` (no adapter
name). The adapted modules are listed by their full paths in ``target_modules``; trained
backbone modules outside LoRA (Llava's projector, a pruned layer's compensation map) go in
``modules_to_save`` under their plain paths. Modules outside the backbone (MVTC, readout,
entity table, learned special tokens) are not PEFT modules and stay in ``elmm.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from elmm_ray.models.elmm import ELMM
from elmm_ray.models.lora import lora_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"


def _backbone_path(elmm: ELMM, name: str) -> str:
    """``name`` (a module or parameter of the ELMM) relative to the Llava backbone."""
    prefix = next(n for n, m in elmm.named_modules() if m is elmm.backbone) + "."
    if not name.startswith(prefix):
        raise ValueError(f"{name} is not part of the backbone ({prefix})")
    return name[len(prefix):]


def peft_state_dict(elmm: ELMM) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The adapter's tensors under PEFT's saved names, the adapted module paths and the
    trained backbone modules outside LoRA (``modules_to_save``)."""
    targets = sorted(_backbone_path(elmm, n) for n in lora_layers(elmm))
    backbone_params = {id(p) for p in elmm.backbone.parameters()}
    state: dict[str, torch.Tensor] = {}
    saved_modules: set[str] = set()
    for name, parameter in elmm.named_parameters():
        if id(parameter) not in backbone_params:
            continue
        path = _backbone_path(elmm, name)
        if ".lora_" in path:
            path = path.replace(f".{ADAPTER_NAME}.", ".")
        elif parameter.requires_grad:
            saved_modules.add(path.rpartition(".")[0])
        else:
            continue
        state[PEFT_PREFIX + path] = parameter.detach().to("cpu").contiguous()
    return state, targets, sorted(saved_modules)


def save_peft_adapter(elmm: ELMM, out_dir: str | Path, base_model: str) -> dict:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` of ``elmm``'s unmerged
    LoRA layers into ``out_dir``; ``base_model`` is what the adapter loads onto (a hub id
    or a folder). Returns a summary (``r``, ``alpha``, targets, saved modules)."""
    settings = getattr(elmm, "lora_settings", None)
    if not settings or not lora_layers(elmm):
        raise ValueError("the model has no LoRA adapters to export (lora.enabled=false?)")
    state, targets, saved_modules = peft_state_dict(elmm)
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"],
                        lora_dropout=settings["dropout"], target_modules=targets,
                        modules_to_save=saved_modules or None, bias="none",
                        base_model_name_or_path=base_model, inference_mode=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return {"dir": out.name, "r": settings["r"], "alpha": settings["alpha"],
            "dropout": settings["dropout"], "target_modules": len(targets),
            "modules_to_save": saved_modules, "base_model": base_model,
            "tensors": len(state)}
