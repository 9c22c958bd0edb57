"""A simulated multi-node Ray cluster for `tests/test_train_ray.py` (run as a subprocess:
`ray.cluster_utils.Cluster` needs a process of its own, the test session already has Ray).

    python tests/multinode_run.py REQUEST.json

REQUEST holds `config` (config file), `overrides` (key=value), `ray_tmpdir` (the cluster's
own temp dir: its address file must not steer other processes' `ray.init()`), `node_caches` (one
ELMM_RUN_CACHE per worker node: with a run directory on object storage each node works in a
mirror of its own, as separate machines would) and `out` (the result JSON).
The cluster: a head node with no CPUs for work (the driver and Ray Train's controller run
there) and two worker nodes of 1 CPU each, all on 127.0.0.1. The driver pushes its mirror
(tokenizer, backbone) first, as `run_stages` does before a stage; the images are packed
(Ray Data tasks on the worker nodes), the model trained, then the features extracted (Ray
Data on the worker nodes). Each Ray Train worker records the node it runs on; the result
holds the nodes, the pack and extract counts and the training summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"


def record_node(record_dir: str):
    """The per-worker function of `elmm_ray.train.trainer`, first noting its rank's node."""
    from elmm_ray.train.loop import train_loop_per_worker

    def worker(config: dict) -> None:
        import ray
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        Path(record_dir, f"rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "node_id": ray.get_runtime_context().get_node_id()}))
        train_loop_per_worker(config)

    return worker


def main(request_file: str) -> None:
    request = json.loads(Path(request_file).read_text())
    os.environ["RAY_TMPDIR"] = request["ray_tmpdir"]
    # A driver joining `127.0.0.1:PORT` has Ray swap the loopback address for the machine's
    # own (services.resolve_ip_for_localhost), where these nodes do not listen; with this
    # switch (read when ray is imported) Ray's address detection answers 127.0.0.1.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from elmm_ray.config import load_config
    from elmm_ray.data.dataset import load_dataset
    from elmm_ray.data.extraction import extract_features
    from elmm_ray.data.shards import pack_images
    from elmm_ray.layout import RunLayout, absolute_paths
    from elmm_ray.ray_session import init_ray
    from elmm_ray.train import trainer
    from elmm_ray.train.context import backbone_source

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": LOOPBACK, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK,
                                env_vars={"ELMM_RUN_CACHE": cache})
               for cache in request["node_caches"]]
    try:
        cfg = load_config(request["config"], [*request["overrides"],
                                               f"ray.address={cluster.address}"])
        kg = load_dataset(cfg)
        layout = RunLayout.of(absolute_paths(cfg))
        layout.push()
        init_ray(cfg.ray)
        # A Ray Data stage on the cluster: pack the images with tasks on the worker nodes,
        # into the run directory on object storage (the tasks upload their shards).
        packed = pack_images(kg, layout.shard_dir, show_progress=False, use_ray=True,
                             mirror=layout.remote)
        layout.push()
        record_dir = Path(request["out"]).parent / "worker_nodes"
        record_dir.mkdir(parents=True, exist_ok=True)
        trainer.train_loop_per_worker = record_node(str(record_dir))
        summary = trainer.train_ray(cfg, kg, show_progress=False)
        # Ray Data extraction on the worker nodes: shards read from the bucket, the backbone
        # pulled into each actor's node mirror, the feature store written to the bucket.
        extracted = extract_features(
            layout.shard_dir, layout.feature_store, backbone=backbone_source(cfg, kg, layout),
            max_images=cfg.images.max_images_per_entity, actors=1, actor_cpus=0.5,
            decode_cpus=0.25, show_progress=False, mirror=layout.remote)
        result = {
            "head_node": cluster.head_node.node_id,
            "worker_nodes": [node.node_id for node in workers],
            "ray_address": cluster.address,
            "driver_node": ray.get_runtime_context().get_node_id(),
            "rank_nodes": {r["rank"]: r["node_id"] for r in (
                json.loads(p.read_text()) for p in sorted(record_dir.glob("rank*.json")))},
            "packed": {"shards": len(packed.manifest["shards"]),
                       "images": packed.manifest["images_packed"], "skipped": packed.skipped},
            "summary": summary,
            "extracted": {"store": extracted.store_dir, "counts": extracted.manifest["counts"]},
        }
        Path(request["out"]).write_text(json.dumps(result, indent=2, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
