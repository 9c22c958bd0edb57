"""Run as ``python -m tests.zero3_mvtc [--unmarked]``: an MVTC under DeepSpeed ZeRO-3 with
every parameter partitioned (``stage3_param_persistence_threshold`` 0, as a 7B model's large
weights are) in a one-process gloo group, against the same MVTC in plain torch. The pooling
attentions read their key projection's and norm's weights outside those modules' forward
(the folded logits), and the model's own method runs it twice before one backward, as the
training loop does (not ``engine(...)``, inside which ZeRO-3 would find such reads itself);
``register_zero3_external_weights`` must make ZeRO-3 gather them (``--unmarked``: without
it). Prints JSON: both losses and the largest weight difference after one AdamW step, or the
error. Its own process: the process group stays out of pytest's.
"""

from __future__ import annotations

import json
import os
import socket
import sys

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
    from elmm_ray.train.deepspeed import disable_jit_ops, register_zero3_external_weights

    disable_jit_ops()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 16, generator=g)
    mask = torch.arange(10)[None, :] < torch.tensor([[10], [4], [0]])
    text, text_mask = torch.randn(3, 5, 24, generator=g), torch.ones(3, 5, dtype=torch.bool)

    class Model(torch.nn.Module):
        """MVTC inside a model whose own method (not ``forward``) runs it, as ELMM's
        ``encode_queries`` does."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.mvtc = MVTC(16, 24, n_visual=4, n_text=3, heads=4, dim=32)
            with torch.no_grad():
                for p in self.mvtc.parameters():
                    p.normal_(0.0, 0.3)

        def encode(self, *args) -> torch.Tensor:
            return self.mvtc(*args)[0]

    build = Model

    def twice(model: Model) -> torch.Tensor:
        """Two calls into one backward, as a step encodes its queries, then its candidates."""
        first = model.encode(x, mask, text, text_mask)
        second = model.encode(x.flip(0), mask.flip(0), text, text_mask)
        return (first * second).mean() + first.square().mean()

    plain, sharded = build(), build()
    marked = 0 if "--unmarked" in sys.argv else register_zero3_external_weights(sharded)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_force_ds_cpu_optimizer": False,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(
        model=sharded, model_parameters=list(sharded.parameters()), config=config,
        optimizer=torch.optim.AdamW(sharded.parameters(), lr=1e-2))
    partitioned = all(p.numel() == 0 for p in sharded.parameters())
    try:
        loss = twice(sharded)
    except RuntimeError as error:
        print(json.dumps({"partitioned": partitioned, "marked": marked, "error": str(error)}))
        dist.destroy_process_group()
        return
    engine.backward(loss)
    engine.step()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    plain_loss = twice(plain)
    plain_loss.backward()
    optimizer.step()
    with deepspeed.zero.GatheredParameters(list(sharded.parameters())):
        diff = max((a - b).abs().max().item()
                   for a, b in zip(sharded.parameters(), plain.parameters()))
    print(json.dumps({"partitioned": partitioned, "marked": marked, "loss": loss.item(),
                      "plain_loss": plain_loss.item(), "max_weight_difference": diff}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
