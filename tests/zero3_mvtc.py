"""Run as ``python -m tests.zero3_mvtc``: an MVTC under DeepSpeed ZeRO-3 with every parameter
partitioned (``stage3_param_persistence_threshold`` 0, as a 7B model's large weights are)
in a one-process gloo group, against the same MVTC in plain torch. The pooling attentions
read their key projection's and norm's weights outside those modules' forward (the folded
logits); ZeRO-3 must gather them there. Prints JSON: both losses and the largest weight
difference after one AdamW step. Its own process: the process group stays out of pytest's.
"""

from __future__ import annotations

import json
import os
import socket

os.environ.update(DS_ACCELERATOR="cpu", DS_BUILD_OPS="0", LOCAL_RANK="0", RANK="0",
                  WORLD_SIZE="1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    import deepspeed

    from elmm_ray.models.mvtc import MVTC
    from elmm_ray.train.deepspeed import disable_jit_ops

    disable_jit_ops()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 16, generator=g)
    mask = torch.arange(10)[None, :] < torch.tensor([[10], [4], [0]])
    text, text_mask = torch.randn(3, 5, 24, generator=g), torch.ones(3, 5, dtype=torch.bool)

    def build() -> MVTC:
        torch.manual_seed(0)
        mvtc = MVTC(16, 24, n_visual=4, n_text=3, heads=4, dim=32)
        with torch.no_grad():
            for p in mvtc.parameters():
                p.normal_(0.0, 0.3)
        return mvtc

    plain, sharded = build(), build()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_force_ds_cpu_optimizer": False,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(
        model=sharded, model_parameters=list(sharded.parameters()), config=config,
        optimizer=torch.optim.AdamW(sharded.parameters(), lr=1e-2))
    partitioned = all(p.numel() == 0 for p in sharded.parameters())
    loss = engine(x, mask, text, text_mask)[0].square().mean()
    engine.backward(loss)
    engine.step()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    plain_loss = plain(x, mask, text, text_mask)[0].square().mean()
    plain_loss.backward()
    optimizer.step()
    with deepspeed.zero.GatheredParameters(list(sharded.parameters())):
        diff = max((a - b).abs().max().item()
                   for a, b in zip(sharded.parameters(), plain.parameters()))
    print(json.dumps({"partitioned": partitioned, "loss": loss.item(),
                      "plain_loss": plain_loss.item(), "max_weight_difference": diff}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
