"""Ray Train worker processes import the heavy modules while Ray is still setting them up.

A Ray Train worker is a new process every fit (and every restart of an elastic or failed
run): Ray's worker boots, the training actor starts, the process group forms, and only then
does the train function arrive and import torch, transformers, peft and DeepSpeed, one after
the other (``bench/results/startup.json``: ``worker_start``). Ray runs
:func:`start` first in every such process (``worker_process_setup_hook`` of the workers'
runtime environment); it returns at once and imports those modules on a background thread,
so they load while the main thread waits on Ray's RPCs and the other ranks (measured here:
about 3 s less per fit of one worker, ``bench/results/startup.json``). The train
function's own imports then find them loaded (or wait for the one being loaded: Python's
per-module import locks). A module that fails here fails again in the train function, which
reports it as usual; nothing here raises. CPU workers only; ``ELMM_PREIMPORT=0`` in the
driver's environment leaves the hook out (:func:`runtime_env_entry`).
"""

from __future__ import annotations

import importlib
import os
import threading

# What train_loop_per_worker's module imports, in import order. DeepSpeed stays in the train
# function: it reads its environment (accelerator, op builds) when imported, which the
# function prepares first (train/deepspeed.py).
MODULES = ("torch", "transformers", "peft", "elmm_ray.train.loop")
HOOK = "elmm_ray.train.warm.start"


def _import_all(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  the train function imports it again and reports it
            return


def runtime_env_entry(use_gpu: bool) -> dict[str, str]:
    """The workers' runtime-env entry that runs :func:`start`: CPU workers only, and none
    with ``ELMM_PREIMPORT=0``. GPU workers import in the train function as before: Ray Train
    widens ``CUDA_VISIBLE_DEVICES`` to the node's GPUs after the worker starts, and an import
    that asked CUDA anything before that (some do, e.g. ``torch.cuda.is_available()``) would
    have fixed the process's devices to its own GPU; not tested on a multi-GPU node."""
    if use_gpu or os.environ.get("ELMM_PREIMPORT", "1") == "0":
        return {}
    return {"worker_process_setup_hook": HOOK}


def start(modules: tuple[str, ...] = MODULES) -> threading.Thread:
    """Import ``modules`` on a daemon thread (Ray's worker setup hook)."""
    thread = threading.Thread(target=_import_all, args=(modules,), name="elmm-preimport",
                              daemon=True)
    thread.start()
    return thread
