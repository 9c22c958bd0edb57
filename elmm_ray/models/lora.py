"""LoRA on the LLM of an ELMM, and checkpoints of everything that trains.

Adapters go only on modules whose full name matches ``target_regex`` (by default the
language model's attention projections; the CLIP tower's ``q_proj``/``v_proj`` must not
match). The modules of :meth:`ELMM.always_trainable` (MVTC, projector, readout, entity
table, learned special tokens) train in full; everything else is frozen.

A checkpoint directory holds ``adapter.safetensors`` (LoRA weights),
``trainable.safetensors`` (every other trainable tensor) and ``trainable.json`` (the LoRA
settings and the name and shape of every tensor), and ``checksums.json`` (size and sha256 of
every file of the directory, sub-folders included: :mod:`elmm_ray.integrity`), checked
before anything is loaded. No pickle anywhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from elmm_ray.integrity import read_json_checked, record_checksums, verify_checksums
from elmm_ray.layout import write_json_atomic
from elmm_ray.models.elmm import ELMM

ADAPTER_FILE = "adapter.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
MANIFEST_FILE = "trainable.json"
FORMAT = "elmm-trainable/1"


class CheckpointMismatchError(RuntimeError):
    """A saved tensor is missing, unexpected or of the wrong shape."""


def _is_lora_name(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def lora_layers(model: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    """Every module carrying a LoRA adapter, by full name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def set_trainable(elmm: ELMM, *, train_llm: bool) -> None:
    """Freeze the backbone (or train the LLM in full) and unfreeze the ELMM heads.

    LoRA weights, when present, always train; the vision tower never does.
    """
    for name, parameter in elmm.named_parameters():
        parameter.requires_grad = _is_lora_name(name)
    if train_llm:
        for parameter in elmm.language_model.parameters():
            parameter.requires_grad = True
    for module in elmm.always_trainable().values():
        for parameter in module.parameters():
            parameter.requires_grad = True


def apply_lora(elmm: ELMM, *, r: int, alpha: int, dropout: float, target_regex: str) -> list[str]:
    """Inject LoRA adapters (in place) into the LLM modules matching ``target_regex``.

    Returns the adapted module names. Raises when nothing matches or when a match lies
    outside the language model (e.g. in the CLIP tower).
    """
    if lora_layers(elmm):
        raise ValueError("this model already has LoRA adapters")
    pattern = re.compile(target_regex)
    language_prefix = _language_model_prefix(elmm)
    matches = [n for n, _ in elmm.named_modules() if n and pattern.fullmatch(n)]
    if not matches:
        raise ValueError(f"LoRA target_regex {target_regex!r} matches no module of the model")
    outside = [n for n in matches if not n.startswith(language_prefix)]
    if outside:
        raise ValueError(
            f"LoRA target_regex {target_regex!r} matches modules outside the language model "
            f"({language_prefix}), e.g. {outside[:3]}; narrow the regex"
        )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex, bias="none"
    )
    inject_adapter_in_model(config, elmm)
    elmm.lora_settings = {"r": r, "alpha": alpha, "dropout": dropout, "target_regex": target_regex}
    set_trainable(elmm, train_llm=False)
    return sorted(lora_layers(elmm))


def merge_lora(elmm: ELMM) -> int:
    """Merge every adapter into its base weight and remove the LoRA layers (for export).

    Returns how many layers were merged.
    """
    layers = lora_layers(elmm)
    for name, layer in layers.items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = elmm.get_submodule(parent_name) if parent_name else elmm
        setattr(parent, child, layer.get_base_layer())
    elmm.lora_settings = None
    return len(layers)


def _language_model_prefix(elmm: ELMM) -> str:
    for name, module in elmm.named_modules():
        if module is elmm.language_model:
            return name + "."
    raise RuntimeError("the ELMM's language model is not one of its submodules")


def _tensor(parameter: torch.Tensor) -> torch.Tensor:
    return parameter.detach().to("cpu").contiguous()


def save_trainable(elmm: ELMM, directory: str | os.PathLike) -> Path:
    """Write the LoRA adapters and all other trainable tensors of ``elmm`` to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter: dict[str, torch.Tensor] = {}
    trainable: dict[str, torch.Tensor] = {}
    for name, parameter in elmm.named_parameters():
        if _is_lora_name(name):
            adapter[name] = _tensor(parameter)
        elif parameter.requires_grad:
            trainable[name] = _tensor(parameter)
    save_file(adapter, str(directory / ADAPTER_FILE), metadata={"format": FORMAT})
    save_file(trainable, str(directory / TRAINABLE_FILE), metadata={"format": FORMAT})
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "lora": getattr(elmm, "lora_settings", None),
        "adapter": {name: list(t.shape) for name, t in adapter.items()},
        "trainable": {name: list(t.shape) for name, t in trainable.items()},
    }
    write_json_atomic(directory / MANIFEST_FILE, manifest)
    record_checksums(directory)
    return directory


def repair_hint(directory: str | os.PathLike) -> str:
    """The way out when the weights in ``directory`` are corrupt."""
    return (f"the weights in {directory} cannot be trusted: rerun the stage that wrote them "
            "(`elmm-ray train`, or `elmm-ray prune` for prune/): the bad file is moved aside, "
            "so that stage is no longer complete and recomputes them")


def load_trainable(elmm: ELMM, directory: str | os.PathLike) -> None:
    """Restore what :func:`save_trainable` wrote (strict), adding LoRA first if needed.

    Every saved tensor must exist in the model with the same shape, every LoRA tensor and
    every always-trainable tensor of the model must be in the checkpoint.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} not found: {directory} is not a directory written by save_trainable"
        )
    verify_checksums(directory, repair_hint(directory), quarantine_bad=True)
    manifest = read_json_checked(manifest_path, repair_hint(directory))
    if manifest.get("format") != FORMAT:
        raise CheckpointMismatchError(
            f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    settings = manifest.get("lora")
    has_lora = bool(lora_layers(elmm))
    if settings and not has_lora:
        apply_lora(elmm, **settings)
    elif has_lora and not settings:
        raise CheckpointMismatchError(
            f"the model has LoRA adapters but the checkpoint in {directory} has none"
        )
    adapter = load_file(str(directory / ADAPTER_FILE))
    trainable = load_file(str(directory / TRAINABLE_FILE))
    parameters = dict(elmm.named_parameters())
    problems = []
    for name, tensor in {**adapter, **trainable}.items():
        if name not in parameters:
            problems.append(f"checkpoint tensor {name} does not exist in the model")
        elif tuple(parameters[name].shape) != tuple(tensor.shape):
            problems.append(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape "
                f"{tuple(parameters[name].shape)}"
            )
    head_ids = {id(p) for m in elmm.always_trainable().values() for p in m.parameters()}
    required = {n for n, p in parameters.items() if _is_lora_name(n) or id(p) in head_ids}
    for name in sorted(required - adapter.keys() - trainable.keys()):
        problems.append(f"model tensor {name} is missing from the checkpoint")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointMismatchError(
            f"checkpoint {directory} does not fit the model ({len(problems)} problem(s)):\n"
            f"{listed}{more}"
        )
    saved = {**adapter, **trainable}
    with torch.no_grad():
        for name, parameter in parameters.items():
            if name in saved:
                parameter.copy_(saved[name].to(parameter.dtype))
            parameter.requires_grad = name in saved
