"""Save and reload pruned backbones (shrunk heads/neurons, compensated attention layers).

A pruned backbone directory holds ``config.json`` (the *unpruned* Llava config, as
written by ``config.save_pretrained``), ``pruning.json`` (per decoder layer: query and
KV heads, MLP neurons, and for a removed attention sublayer the rank and bias of its
compensation map) and ``model.safetensors`` (every backbone tensor, LoRA adapters left
out: ``base_layer`` weights are saved under their plain names). Loading builds the model
from the config, reshapes it as ``pruning.json`` says, then loads the weights strictly.

Order with LoRA: prune the merged model, then apply fresh adapters; save the pruned base
with :func:`save_pruned_backbone` and the adapters + heads with ``save_trainable``;
reload with :func:`load_pruned_backbone` (or :func:`load_pruned_weights` on an already
built ELMM backbone) *before* ``load_trainable`` (which re-applies LoRA).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from elmm_ray.integrity import record_checksums, verify_checksums
from elmm_ray.layout import write_json_atomic
from elmm_ray.models.backbone import resolve_dtype
from elmm_ray.models.elmm import ELMM
from elmm_ray.models.lora import repair_hint, save_trainable
from elmm_ray.models.surgery import (
    LinearCompensation,
    attention_shape,
    base_linear,
    remove_kv_groups,
    remove_neurons,
    replace_attention,
)

SPEC_FILE = "pruning.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "elmm-pruned-backbone/1"
MODEL_BACKBONE_SUBDIR = "backbone"  # inside a saved pruned model directory


def _backbone(model: ELMM | LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    return model.backbone if isinstance(model, ELMM) else model


def _layers(backbone: LlavaForConditionalGeneration) -> nn.ModuleList:
    return backbone.model.language_model.layers


def pruning_spec(model: ELMM | LlavaForConditionalGeneration) -> dict:
    """Per-layer shapes of a (possibly) pruned backbone, as written to ``pruning.json``."""
    backbone = _backbone(model)
    text = backbone.config.text_config
    layers = []
    for index, layer in enumerate(_layers(backbone)):
        neurons = base_linear(layer.mlp.gate_proj).out_features
        entry: dict = {"index": index, "neurons": neurons}
        if isinstance(layer.self_attn, LinearCompensation):
            comp = layer.self_attn
            entry |= {"attention": "compensated", "heads": 0, "kv_heads": 0,
                      "compensation": {"rank": comp.rank, "bias": comp.has_bias,
                                       "context": comp.uses_context}}
        else:
            heads, kv_heads, _, _ = attention_shape(layer.self_attn)
            entry |= {"attention": "heads", "heads": heads, "kv_heads": kv_heads,
                      "compensation": None}
        layers.append(entry)
    return {
        "format": FORMAT,
        "hidden_size": text.hidden_size,
        "num_layers": text.num_hidden_layers,
        "original": {"heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads,
                     "neurons": text.intermediate_size},
        "removed_attention_layers": [e["index"] for e in layers
                                     if e["attention"] == "compensated"],
        "layers": layers,
    }


def is_pruned(model: ELMM | LlavaForConditionalGeneration) -> bool:
    """Whether any layer differs from the config's shapes."""
    spec = pruning_spec(model)
    original = spec["original"]
    return any(e["attention"] == "compensated" or e["heads"] != original["heads"]
               or e["neurons"] != original["neurons"] for e in spec["layers"])


def apply_pruning_spec(model: ELMM | LlavaForConditionalGeneration, spec: dict) -> None:
    """Reshape an unpruned backbone to the shapes of ``spec`` (weights are placeholders
    until loaded: the first KV groups / neurons are kept)."""
    backbone = _backbone(model)
    text = backbone.config.text_config
    if spec.get("format") != FORMAT:
        raise ValueError(f"pruning spec has format {spec.get('format')!r}, expected {FORMAT!r}")
    layers = _layers(backbone)
    if spec["num_layers"] != len(layers) or spec["hidden_size"] != text.hidden_size:
        raise ValueError(
            f"pruning spec is for {spec['num_layers']} layers of width {spec['hidden_size']}, "
            f"the backbone has {len(layers)} of width {text.hidden_size}")
    for entry, layer in zip(spec["layers"], layers):
        if any(isinstance(m, BaseTunerLayer) for m in layer.modules()):
            raise ValueError("apply the pruning spec before LoRA adapters are added")
        mlp_now = base_linear(layer.mlp.gate_proj).out_features
        if entry["neurons"] < mlp_now:
            remove_neurons(layer.mlp, range(entry["neurons"], mlp_now))
        if entry["attention"] == "compensated":
            parameter = next(layer.parameters())
            comp = entry["compensation"]
            # files written before token mixing existed have no "context" key
            entry = entry | {"compensation": comp | {"context": comp.get("context", False)}}
            replace_attention(layer, LinearCompensation(
                text.hidden_size, comp["rank"], bias=comp["bias"], dtype=parameter.dtype,
                device=parameter.device, context=entry["compensation"]["context"]))
        else:
            _, kv_now, _, _ = attention_shape(layer.self_attn)
            if entry["kv_heads"] < kv_now:
                remove_kv_groups(layer.self_attn, range(entry["kv_heads"], kv_now))
        actual = pruning_spec(backbone)["layers"][entry["index"]]
        if actual != entry:
            raise ValueError(f"layer {entry['index']}: could not reshape to {entry} "
                             f"(got {actual})")


def base_state_dict(model: ELMM | LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The backbone's tensors without LoRA adapters, ``base_layer`` names made plain."""
    state = {}
    for name, tensor in _backbone(model).state_dict().items():
        if ".lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def save_pruned_backbone(model: ELMM | LlavaForConditionalGeneration,
                         directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``config.json``, ``pruning.json`` and ``model.safetensors`` (see module doc).

    ``extra`` (JSON-able, e.g. the pruning report) is stored in ``pruning.json``."""
    backbone = _backbone(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backbone.config.save_pretrained(directory)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in base_state_dict(backbone).items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]  # tied weights are stored once
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    spec = pruning_spec(backbone) | {"aliases": aliases}
    if extra is not None:
        spec["extra"] = extra
    write_json_atomic(directory / SPEC_FILE, spec)
    record_checksums(directory)
    return directory


def is_pruned_backbone(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`save_pruned_backbone`."""
    path = Path(path)
    return (path / SPEC_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read_spec(directory: str | os.PathLike) -> dict:
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a pruned backbone "
                                "directory (written by save_pruned_backbone)")
    return json.loads(path.read_text())


@torch.no_grad()
def load_pruned_weights(model: ELMM | LlavaForConditionalGeneration,
                        directory: str | os.PathLike) -> None:
    """Reshape an unpruned backbone (or an ELMM's) as saved in ``directory`` and load the
    saved weights into it, strictly. Call before LoRA adapters are applied."""
    backbone = _backbone(model)
    verify_checksums(directory, repair_hint(directory), quarantine_bad=True)
    spec = read_spec(directory)
    apply_pruning_spec(backbone, spec)
    saved = load_file(str(Path(directory) / WEIGHTS_FILE))
    state = backbone.state_dict()
    aliases = spec.get("aliases", {})
    missing = sorted(set(state) - set(saved) - set(aliases))
    unexpected = sorted(set(saved) - set(state))
    wrong = sorted(n for n in set(saved) & set(state) if saved[n].shape != state[n].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"pruned backbone {directory} does not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    for name, tensor in state.items():
        source = saved[name] if name in saved else saved[aliases[name]]
        tensor.copy_(source.to(tensor.dtype))


def load_pruned_backbone(directory: str | os.PathLike, dtype: str | torch.dtype = "float32"
                         ) -> LlavaForConditionalGeneration:
    """A pruned backbone from ``directory`` (config -> reshape -> weights), in eval mode."""
    from transformers.initialization import no_init_weights

    config = LlavaConfig.from_pretrained(str(directory))
    with no_init_weights():
        backbone = LlavaForConditionalGeneration(config)
    backbone.to(resolve_dtype(dtype))
    load_pruned_weights(backbone, directory)
    return backbone.eval()


def load_any_backbone(source: str | os.PathLike, dtype: str | torch.dtype = "float32", *,
                      trust_remote_code: bool = False) -> LlavaForConditionalGeneration:
    """:func:`load_pruned_backbone` for a pruned directory, else the project's loader."""
    if is_pruned_backbone(source):
        return load_pruned_backbone(source, dtype)
    from elmm_ray.models.backbone import load_backbone

    return load_backbone(source, dtype, trust_remote_code=trust_remote_code)


def save_pruned_model(model: ELMM, directory: str | os.PathLike,
                      extra: dict | None = None) -> Path:
    """A whole pruned ELMM: the pruned backbone into ``directory/backbone`` and the trainable
    tensors (adapters, MVTC, heads, entity table) into ``directory``; reload with
    :func:`elmm_ray.train.context.load_pruned_context`."""
    directory = Path(directory)
    save_pruned_backbone(model, directory / MODEL_BACKBONE_SUBDIR, extra)
    save_trainable(model, directory)
    return directory
