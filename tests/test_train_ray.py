"""Ray Train + DeepSpeed on CPU (gloo): ZeRO-2/3 parity with a single process, one loss
curve at 1, 2 and 3 workers, resume across worker counts, exact resume after a worker dies,
and re-running a finished run.

The objective is the global batch's at any worker count (in-batch answers and sampled
negatives gathered across the ranks), so with no LoRA dropout (each rank draws its own
masks) 1, 2 or 3 workers take the same gradient steps: the loss curves agree to 1e-4, the
weights to float noise (tests/parity.py: the ranks' sums of gradients round differently
from one process's, on any CPU; gradient-free weights, which AdamW moves by that noise at
full step size, only in the mean). Their
ranking metrics then agree within the intervals the two models' score difference allows
(tests/parity.py: derived from the scores, since a near-tie can swap on any rounding).
Evaluating one set of weights on Ray workers and in one process is the same computation,
batch for batch: exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elmm_ray.cli import main
from elmm_ray.config import load_config
from elmm_ray.data.dataset import load_dataset
from elmm_ray.data.shards import pack_images
from elmm_ray.eval.evaluate import evaluate_model
from elmm_ray.layout import RunLayout, absolute_paths
from elmm_ray.remote import mirror_dir
from elmm_ray.stages import run_stage
from elmm_ray.stages.export import eval_export, export_run
from elmm_ray.stages.train import evaluate
from elmm_ray.train.context import final_context, load_trained_context
from elmm_ray.train.loop import LoopSpec, train_local
from elmm_ray.train.trainer import train_ray
from tests.conftest import REPO_ROOT
from tests.parity import assert_metrics_within_score_noise, assert_weights_match

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]

TINY = [
    "dataset.synth.num_entities=48", "dataset.synth.max_images=2",
    "dataset.synth.image_size=32", "images.max_images_per_entity=2",
    "model.preset=tiny-test", "model.entity_repr=table", "model.patch_size=16",
    "model.llm_hidden=32", "model.llm_intermediate=64", "model.vocab_size=200",
    "mvtc.n_visual=2", "mvtc.n_text=2", "mvtc.heads=2",
    "lora.dropout=0", "train.num_negatives=4",
    "train.global_batch_size=16", "train.epochs=2", "train.eval_every=6",
    "train.val_max_queries=20",
    "train.learning_rate=0.003", "train.num_workers=2", "train.cpus_per_worker=0.9",
    "train.checkpoints_to_keep=2", "eval.batch_size=64",
]


def _prepared_run(tmp_path_factory, name: str, base, *overrides: str):
    """A run directory sharing the dataset, shards, tokenizer and backbone of ``base``."""
    run_dir = tmp_path_factory.mktemp(name)
    cfg = load_config("configs/demo.yaml", [f"run_dir={run_dir}", *TINY,
                                            f"dataset.path={base / 'data'}",
                                            "dataset.name=synth",
                                            f"images.shard_dir={base / 'shards'}", *overrides])
    for part in ("tokenizer", "backbone"):
        shutil.copytree(base / part, run_dir / part)
    return cfg


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Synthetic data, shards, and the run's tokenizer + backbone, made once."""
    from elmm_ray.train.context import backbone_source

    root = tmp_path_factory.mktemp("base")
    cfg = load_config("configs/demo.yaml", [f"run_dir={root}", *TINY])
    run_stage("synth", cfg)
    kg = load_dataset(cfg)
    pack_images(kg, root / "shards", use_ray=False)
    backbone_source(cfg, kg, RunLayout(root))
    return root


def _trainable(cfg) -> dict[str, torch.Tensor]:
    out = {}
    model_dir = RunLayout.of(cfg).trained_model
    for f in ("adapter.safetensors", "trainable.safetensors"):
        out.update(load_file(str(model_dir / f)))
    return out


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst < atol, f"largest parameter difference {worst}"


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, base):
    """Single process, the same global batch of 16: the same steps as 2 workers."""
    cfg = _prepared_run(tmp_path_factory, "local", base, "train.backend=local",
                        "train.num_workers=1")
    kg = load_dataset(cfg)
    summary = train_local(cfg, kg, show_progress=False)
    return cfg, summary


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, base, ray_session):
    cfg = _prepared_run(tmp_path_factory, "zero2", base, "deepspeed.zero_stage=2")
    return cfg, train_ray(cfg, load_dataset(cfg))


def test_zero2_two_workers_match_single_process(local_reference, zero2_run):
    local_cfg, local_summary = local_reference
    cfg, summary = zero2_run
    assert summary["steps"] == local_summary["steps"] > 0
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]
    assert_weights_match(_trainable(cfg), _trainable(local_cfg))
    assert RunLayout.of(cfg).path("train", "training_curve.png").is_file()
    assert RunLayout.of(cfg).path("train", "tensorboard").is_dir()
    # Checkpoints kept: the best by validation MRR plus the latest.
    assert 1 <= len(summary["best_checkpoints"]) <= cfg.train.checkpoints_to_keep
    _assert_metrics_follow(local_cfg, cfg)
    # The fit's start-up profile: every phase up to the first step, in order, within the fit.
    startup = summary["startup"]
    phases = ["to_worker_process", "worker_start", "imports", "dataset", "model", "queries",
              "engine", "first_step"]
    assert all(startup[p] >= 0 for p in phases), startup
    assert abs(sum(startup[p] for p in phases) - startup["to_first_step"]) < 0.01
    assert 0 < startup["fixed"] < startup["fit"] and startup["after_last_step"] >= 0


def _assert_metrics_follow(reference_cfg, cfg) -> dict:
    """The test metrics of ``cfg``'s trained model lie within the score-noise intervals of
    the reference training's model (tests/parity.py)."""
    kg = load_dataset(cfg)
    metrics = evaluate(cfg, kg, load_trained_context(cfg, kg))
    return assert_metrics_within_score_noise(load_trained_context(reference_cfg, kg),
                                             load_trained_context(cfg, kg), kg, metrics,
                                             split=cfg.eval.split,
                                             max_queries=cfg.eval.max_queries or 0)


# Losses of one global batch computed by 1, 2 or 3 workers, after the same steps: float
# rounding only (measured here: at most 9.5e-7 over the 46 steps; 1e-4 leaves room for other CPUs'
# kernels). What still differs between worker counts: LoRA dropout masks (each rank draws
# its own; these runs switch dropout off) and the rounding of the gradient sums.
LOSS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory, base, ray_session):
    """The tiny run started on W workers, killed at step 9 (its checkpoint of step 6 is
    kept), then resumed under the same Ray Train run on W' workers: 2 -> 1 under ZeRO-2 and
    1 -> 3 under ZeRO-3 (each rank holds a third of the weights and moments it restores)."""
    from ray.train import TrainingFailedError

    from elmm_ray.layout import absolute_paths

    runs = {}
    for first, then, zero in ((2, 1, 2), (1, 3, 3)):
        name = f"resume_{first}to{then}"
        cfg = absolute_paths(_prepared_run(
            tmp_path_factory, name, base, f"deepspeed.zero_stage={zero}", "train.fail_at_step=9",
            "train.max_failures=0", "train.cpus_per_worker=0.6",
            f"train.num_workers={first}"))
        spec = LoopSpec(run_name=name)
        with pytest.raises(TrainingFailedError):  # max_failures=0: the run stops
            train_ray(cfg, load_dataset(cfg), spec, show_progress=False)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=then))
        console = io.StringIO()
        with contextlib.redirect_stdout(console):  # the driver's console lines
            summary = train_ray(cfg, load_dataset(cfg), spec)
        runs[(first, then)] = (cfg, summary, console.getvalue())
    return runs


def test_one_loss_curve_on_1_2_and_3_workers_and_resumes_across_worker_counts(
        local_reference, zero2_run, resumed_runs):
    """One objective at every world size: one process, 2 Ray workers, and runs that moved
    2 -> 1 and 1 -> 3 workers at step 6 give one loss curve and the same trained weights
    (the tolerances of ZeRO parity); each resume is said on the console and in the summary
    (the portable checkpoint of W workers restored on W': weights, AdamW moments, schedule,
    data position, RNG)."""
    local_cfg, local_summary = local_reference
    reference_cfg, reference = zero2_run
    curve = local_summary["losses"]
    assert len(curve) == reference["steps"] > 9
    assert reference["losses"] == pytest.approx(curve, abs=LOSS_TOLERANCE)
    for (first, then), (cfg, summary, console) in resumed_runs.items():
        assert summary["resumes"] == [{"step": 6, "from_workers": first, "workers": then}]
        assert f"resumed from step 6: checkpoint of {first} worker(s), now {then}" in console
        assert [h["workers"] for h in summary["history"]][:2] == [first, then]
        gap = max(abs(a - b) for a, b in zip(summary["losses"], curve, strict=True))
        print(f"loss gap {first} -> {then} workers vs one process: {gap:.2e}")
        assert summary["losses"] == pytest.approx(curve, abs=LOSS_TOLERANCE), (first, then)
        assert_weights_match(_trainable(cfg), _trainable(local_cfg))
        _assert_metrics_follow(reference_cfg, cfg)


def _storage(s3_server, prefix: str) -> list[str]:
    return [f"train.storage_path=s3://{s3_server.bucket}/{prefix}",
            f"storage_endpoint={s3_server.endpoint}"]


def test_worker_death_resumes_exactly_from_its_last_checkpoint_on_s3(
        tmp_path_factory, base, ray_session, zero2_run, s3_server, monkeypatch):
    """A worker dies at step 9 (train.max_failures=1), its checkpoints objects on an S3 server
    (train.storage_path: nothing under <run_dir>/ray_train), the run directory relative to
    the driver's working directory (the workers run elsewhere): the restarted workers resume
    from the checkpoint of step 6 (weights, optimizer state, data position, sampler state)
    and end where the uninterrupted run does; re-running the finished run trains no step;
    one MLflow run holds both attempts and the rerun."""
    reference_cfg, reference = zero2_run
    # With MLflow installed, rank 0 also logs to the run directory's default SQLite store.
    mlflow = importlib.util.find_spec("mlflow") is not None
    loggers = "[jsonl,tensorboard,mlflow]" if mlflow else "[jsonl,tensorboard]"
    cfg = _prepared_run(tmp_path_factory, "fault", base, "deepspeed.zero_stage=2",
                        "train.fail_at_step=9", "train.max_failures=1",
                        f"train.loggers={loggers}", *_storage(s3_server, "fault"))
    run_dir = Path(cfg.run_dir)
    monkeypatch.chdir(run_dir.parent)
    cfg = dataclasses.replace(cfg, run_dir=run_dir.name)
    summary = train_ray(cfg, load_dataset(cfg))
    layout = RunLayout.of(cfg)
    assert layout.path("train", ".fault_injected").is_file()  # it did die
    assert not layout.ray_train_storage.exists()
    run = f"s3://{s3_server.bucket}/fault/train/"
    assert summary["checkpoint"].startswith(run + "checkpoint_")
    keys = s3_server.keys("fault/train/")
    latest = summary["checkpoint"].removeprefix(f"s3://{s3_server.bucket}/")
    portable = {f"{latest}/portable/{f}" for f in ("weights.safetensors",
                                                   "optimizer.safetensors", "state.json",
                                                   "rng.pt")}
    assert portable <= set(keys)  # the worker-count-free checkpoint, written by rank 0
    _assert_close(_trainable(cfg), _trainable(reference_cfg), atol=1e-5)
    fault_curve = [(h["step"], round(h["val_mrr"], 5)) for h in summary["history"]]
    reference_curve = [(h["step"], round(h["val_mrr"], 5)) for h in reference["history"]]
    assert fault_curve == reference_curve

    # Re-running the finished run resumes from its latest checkpoint: no new steps.
    again = train_ray(cfg, load_dataset(cfg))
    assert again["steps"] == summary["steps"]
    _assert_close(_trainable(cfg), _trainable(reference_cfg), atol=1e-5)
    if mlflow:  # one tracking run across the restart and the rerun, each step logged once
        from mlflow import MlflowClient

        from elmm_ray.tracking import TRACKING_FILE, mlflow_uri

        tracking = json.loads(RunLayout.of(cfg).path(TRACKING_FILE).read_text())["mlflow"]
        client = MlflowClient(tracking_uri=mlflow_uri(absolute_paths(cfg)))
        assert tracking["uri"] == mlflow_uri(absolute_paths(cfg))
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        runs = client.search_runs([experiment.experiment_id])
        assert [r.info.run_id for r in runs] == [tracking["run_id"]]
        logged = [m.step for m in client.get_metric_history(tracking["run_id"], "train/loss")]
        steps = [h["step"] for h in summary["history"]]
        # The killed attempt logged step 6; the restart continued from its checkpoint, or,
        # when Ray had not registered that checkpoint before the death, trained again from
        # step 1 (into the same run: the history shows both attempts).
        assert logged in (steps, [6, *steps]), logged
        artifacts = [a.path for a in client.list_artifacts(tracking["run_id"], "train")]
        assert "train/training_curve.png" in artifacts


def test_pruning_runs_on_ray_workers_and_finetunes_through_the_same_loop(ray_session,
                                                                         zero2_run):
    """train.backend=ray: the driver only orchestrates the prune stage (it never builds the
    model): each round's importance pass and evaluations run in a Ray task, its fine-tuning
    on Ray Train workers (they load the pruned model the task saved, rank 0 writes the
    result back); the saved pruned model scores what the report says."""
    from elmm_ray.models.build import forbid_model_build
    from elmm_ray.stages.base import StageContext
    from elmm_ray.stages.prune import run_prune
    from elmm_ray.train.context import load_pruned_context

    trained_cfg, _ = zero2_run
    cfg = dataclasses.replace(trained_cfg, prune=dataclasses.replace(
        trained_cfg.prune, method="magnitude", ratio=0.3, steps=2, finetune_steps=4,
        calib_samples=8))
    with forbid_model_build("the driver only orchestrates (test)"):
        payload = run_prune(StageContext(cfg, show_progress=False))
    layout = RunLayout.of(cfg)
    for k in (1, 2):
        finetuned = layout.path("prune", f"finetune_{k}")
        assert (finetuned / "start" / "backbone" / "pruning.json").is_file()  # workers load it
        assert (finetuned / "model" / "trainable.json").is_file()  # what rank 0 wrote back
        assert (layout.ray_train_storage / f"prune_finetune_{k}").is_dir()  # a Ray Train run
        history = [json.loads(x) for x in (finetuned / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history] == [4] and history[0]["workers"] == 2
    report = json.loads(layout.path("prune", "prune_report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][1]["amount"] == pytest.approx(0.3)
    assert all("post_ft" in r and "finetune" in r for r in report["rounds"])
    kg = load_dataset(cfg)
    ctx = load_pruned_context(cfg, kg)
    metrics = evaluate(cfg, kg, ctx)
    assert metrics["overall"]["mrr"] == pytest.approx(payload["post_ft"]["mrr"], abs=1e-6)
    assert payload["unpruned"]["mrr"] > 0 and payload["speedup"] > 0


def test_encoder_entities_under_zero3_match_a_single_process_then_export_and_predict(
        tmp_path_factory, base, ray_session, capsys):
    """model.entity_repr=encoder: candidates encoded with gradients on every rank, the
    entity cache refreshed sharded over the ranks (each encodes a slice, all gather), under
    ZeRO-3 with 2 workers: the same parameters as one process with the global batch (ZeRO-3
    with the entity table: the 1 -> 3 worker resume above). The best validation round is
    kept, gathered from the ZeRO-3 partitions; the export (LoRA merged) evaluates as the
    trained model does and answers `elmm-ray predict`; evaluation on Ray workers equals one
    process's."""
    encoder = ["model.entity_repr=encoder", "train.entity_refresh_every=4"]
    local_cfg = _prepared_run(tmp_path_factory, "enc_local", base, *encoder,
                              "train.backend=local",
                              "train.num_workers=1")
    train_local(local_cfg, load_dataset(local_cfg), show_progress=False)
    cfg = _prepared_run(tmp_path_factory, "enc_zero3", base, *encoder, "deepspeed.zero_stage=3")
    summary = train_ray(cfg, load_dataset(cfg))
    assert summary["steps"] > 4  # the sharded refresh ran on both ranks
    assert [h["step"] for h in summary["history"]][-1] == summary["steps"]
    # Training parity: the weights to float tolerance, the metrics within its score noise.
    assert_weights_match(_trainable(cfg), _trainable(local_cfg))
    _assert_metrics_follow(local_cfg, cfg)
    kg = load_dataset(cfg)

    # The best validation round is kept (gathered from the ZeRO-3 partitions) with its record.
    best = max(summary["history"], key=lambda h: h["val_mrr"])
    record = json.loads((RunLayout.of(cfg).best_model / "best.json").read_text())
    assert (record["step"], record["val_mrr"]) == (best["step"], best["val_mrr"])
    ctx = final_context(cfg, kg, "best")
    again = evaluate_model(ctx.model, ctx.collator, ctx.features, kg, split="valid",
                           batch_size=cfg.eval.batch_size,
                           max_queries=cfg.train.val_max_queries, ks=cfg.eval.hits_at)
    assert again["overall"]["mrr"] == pytest.approx(record["val_mrr"], abs=1e-5)

    # Export (LoRA merged) -> eval on the export equals the trained model in memory.
    in_memory = evaluate(cfg, kg, load_trained_context(cfg, kg))
    out = export_run(cfg, kg)
    exported = eval_export(out)
    for key in ("mrr", "hits@1", "hits@3", "hits@10"):
        assert exported["overall"][key] == pytest.approx(in_memory["overall"][key], abs=1e-6)
    head, rel, _ = kg.triples["test"][0]
    capsys.readouterr()
    assert main(["predict", str(out), "--head", kg.entities[head], "--relation",
                 kg.relation_texts[rel], "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    title = lines.index(f"({kg.entities[head]}, {kg.relation_texts[rel]}, ?)")
    header, rule, *rows = lines[title + 1 : title + 6]  # Ray may log lines of its own too
    assert header.split() == ["rank", "id", "name", "score"]
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    assert all(r.split()[1] in kg.entity_index for r in rows)
    assert main(["predict", str(out), "--head", "no such entity", "--relation",
                 kg.relation_texts[rel]]) == 2
    # Evaluation parity, the same saved weights: on 2 Ray workers each encodes its whole
    # batches of the entities, both rank against the gathered table, each ranks its whole
    # batches of the queries; one process (with the workers' thread count) runs the same
    # batches, so the figures agree exactly.
    from elmm_ray.models.build import forbid_model_build
    from elmm_ray.train.ray_eval import evaluate_on_ray

    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, batch_size=16))
    with forbid_model_build("the driver only orchestrates (test)"):
        on_ray = evaluate_on_ray(cfg, kg, workers=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.threads_per_worker)
    try:
        here = evaluate(cfg, kg, load_trained_context(cfg, kg))
    finally:
        torch.set_num_threads(threads)
    assert on_ray["num_queries"] == here["num_queries"] > 0
    for key, value in here["overall"].items():
        assert on_ray["overall"][key] == pytest.approx(value, abs=1e-6), key


def test_eval_runs_on_ray_workers_and_the_driver_never_builds_the_model(zero2_run):
    """The eval stage of a Ray run: 2 workers each rank half of the test queries; the driver
    (forbidden to build the model) only gathers, and the metrics equal one process's."""
    from elmm_ray.models.build import forbid_model_build
    from elmm_ray.stages.export import export_on_ray
    from elmm_ray.train.ray_eval import eval_workers, evaluate_on_ray

    cfg, _ = zero2_run
    kg = load_dataset(cfg)
    assert eval_workers(cfg) == 2
    with forbid_model_build("the driver only orchestrates (test)"):
        on_ray = evaluate_on_ray(cfg, kg)
        with pytest.raises(RuntimeError, match="must not build it"):  # the guard works
            load_trained_context(cfg, kg)
        exported = export_on_ray(cfg)
    here = evaluate(cfg, kg, load_trained_context(cfg, kg))
    assert on_ray["num_queries"] == here["num_queries"] > 0
    for key, value in here["overall"].items():
        assert on_ray["overall"][key] == pytest.approx(value, abs=1e-9), key
    # The export made on a worker is the trained model: its own evaluation agrees.
    assert eval_export(exported)["overall"]["mrr"] == pytest.approx(
        here["overall"]["mrr"], abs=1e-6)


def test_two_nodes_with_the_run_directory_on_s3_match_one_node(
        tmp_path_factory, base, zero2_run, s3_server, monkeypatch):
    """A local multi-node cluster (tests/multinode_run.py in a subprocess: a head node with
    no CPUs for work, two worker nodes of 1 CPU, all on 127.0.0.1): the images are packed
    with Ray Data on the worker nodes, the two Ray Train workers run on different nodes, the
    run directory is on the S3 server (each node works in a mirror of its own, as separate
    machines do; checkpoints go to <run_dir>/ray_train there), and the run ends exactly where
    the one-node run of the same seed and world size (zero2_run) does: gloo's collectives over
    two nodes give the same sums in the same order as over one."""
    reference_cfg, reference = zero2_run
    work = tmp_path_factory.mktemp("multinode")
    caches = {name: work / f"cache_{name}" for name in ("driver", "node1", "node2", "reader")}
    run_uri = f"s3://{s3_server.bucket}/multinode"
    monkeypatch.setenv("ELMM_RUN_CACHE", str(caches["driver"]))
    driver_mirror = mirror_dir(run_uri)
    for part in ("tokenizer", "backbone"):
        shutil.copytree(base / part, driver_mirror / part)
    request = {
        "config": "configs/demo.yaml",
        "ray_tmpdir": str(tmp_path_factory.mktemp("cluster")), "out": str(work / "out.json"),
        "node_caches": [str(caches["node1"]), str(caches["node2"])],
        "overrides": [f"run_dir={run_uri}", f"storage_endpoint={s3_server.endpoint}", *TINY,
                      f"dataset.path={base / 'data'}", "dataset.name=synth",
                      "deepspeed.zero_stage=2"]}
    (work / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "multinode_run.py"),
                           str(work / "request.json")], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((work / "out.json").read_text())

    assert result["driver_node"] == result["head_node"]
    ranks = result["rank_nodes"]
    assert sorted(ranks) == ["0", "1"]
    assert ranks["0"] != ranks["1"] and set(ranks.values()) == set(result["worker_nodes"])
    base_manifest = json.loads((base / "shards" / "manifest.json").read_text())
    assert result["packed"]["images"] == base_manifest["images_packed"] > 0
    summary = result["summary"]
    assert summary["checkpoint"].startswith(f"{run_uri}/ray_train/train/")
    assert s3_server.keys(summary["checkpoint"].removeprefix(f"s3://{s3_server.bucket}/"))
    # Both worker nodes pulled the inputs into their own mirrors; rank 0 pushed the trained
    # model, which the driver pulled (train_ray checks it) and a new mirror pulls too.
    for node in ("node1", "node2"):
        node_mirror = caches[node] / "s3" / s3_server.bucket / "multinode"
        assert (node_mirror / "tokenizer").is_dir(), node
    assert (driver_mirror / "train" / "model" / "trainable.json").is_file()
    assert any(k.startswith("multinode/shards/shard-") for k in s3_server.keys("multinode/"))
    extracted = result["extracted"]
    assert extracted["store"].startswith(f"{run_uri}/features")
    assert extracted["counts"]["failed"] == 0
    assert extracted["counts"]["done"] == result["packed"]["images"] > 0
    assert any(k.startswith("multinode/features/parts/") for k in s3_server.keys("multinode/"))
    monkeypatch.setenv("ELMM_RUN_CACHE", str(caches["reader"]))
    assert [(h["step"], h["val_mrr"], h["loss"]) for h in summary["history"]] == [
        (h["step"], h["val_mrr"], h["loss"]) for h in reference["history"]]
    cfg = load_config("configs/demo.yaml", request["overrides"])
    RunLayout.of(cfg).pull()
    trained, expected = _trainable(cfg), _trainable(reference_cfg)
    assert trained.keys() == expected.keys()
    assert all(torch.equal(trained[k], expected[k]) for k in trained)  # bit for bit
