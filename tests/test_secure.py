"""Secure defaults: no pickle, safetensors weights only, remote code only when asked, the
dashboard never on every interface, Ray token auth left to Ray, no secret in a run directory."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

from elmm_ray.config import RayConfig, load_config
from tests.conftest import REPO_ROOT
from tests.tiny import TINY

SOURCES = sorted(p for d in ("elmm_ray", "jobs", "bench") for p in (REPO_ROOT / d).rglob("*.py"))


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            yield name, node.func.attr, {k.arg: k.value for k in node.keywords}, node


def _const(node) -> object:
    return node.value if isinstance(node, ast.Constant) else "<expr>"


def _safe_loader(loader: ast.expr | None, path: Path) -> bool:
    """``yaml.SafeLoader`` / ``CSafeLoader``, or a class of the same file derived from it."""
    if isinstance(loader, ast.Attribute):
        return loader.attr in ("SafeLoader", "CSafeLoader")
    if isinstance(loader, ast.Name):
        return any(isinstance(n, ast.ClassDef) and n.name == loader.id
                   and any(_safe_loader(base, path) for base in n.bases)
                   for n in ast.walk(ast.parse(path.read_text())))
    return False


def test_no_pickle_and_torch_load_only_with_weights_only():
    problems = []
    for path in SOURCES:
        for owner, attr, kw, node in _calls(path):
            where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
            if owner in ("pickle", "cPickle", "dill", "joblib") and attr in ("load", "loads"):
                problems.append(f"{where}: {owner}.{attr}")
            if owner == "torch" and attr == "load" and _const(kw.get("weights_only")) is not True:
                problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "np" and attr == "load" and _const(kw.get("allow_pickle", ast.Constant(
                    False))) is not False:
                problems.append(f"{where}: np.load with allow_pickle")
            if owner == "yaml" and attr in ("load", "load_all", "unsafe_load", "full_load"):
                if not _safe_loader(kw.get("Loader"), path):
                    problems.append(f"{where}: yaml.{attr} without a safe loader")
    assert not problems
    assert len(SOURCES) > 50  # the walk saw the code


def test_from_pretrained_asks_for_safetensors_and_remote_code_explicitly():
    problems = []
    for path in (p for p in SOURCES if p.is_relative_to(REPO_ROOT / "elmm_ray")):
        for owner, attr, kw, node in _calls(path):
            if attr != "from_pretrained":
                continue
            where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
            if owner.startswith("Auto") and "trust_remote_code" not in kw:
                problems.append(f"{where}: {owner}.from_pretrained without trust_remote_code")
            if owner.endswith("ForConditionalGeneration") and (
                    _const(kw.get("use_safetensors")) is not True or "trust_remote_code" not in kw):
                problems.append(f"{where}: weights without use_safetensors=True")
    assert not problems


def test_trust_remote_code_is_off_by_default_passed_through_and_warned(monkeypatch, caplog):
    from elmm_ray.models import backbone, tokenizer

    seen = []
    monkeypatch.setattr(tokenizer.AutoTokenizer, "from_pretrained",
                        lambda name, **kw: seen.append(("tokenizer", kw)) or "tok")
    monkeypatch.setattr(backbone.LlavaForConditionalGeneration, "from_pretrained",
                        lambda name, **kw: seen.append(("model", kw)) or pytest.skip("stub"))
    assert load_config(None, []).model.trust_remote_code is False
    with caplog.at_level(logging.WARNING):
        tokenizer.load_tokenizer("org/ckpt")
        assert not caplog.records
        tokenizer.load_tokenizer("org/ckpt", trust_remote_code=True)
        assert "may run its own Python code" in caplog.text
    assert [kw["trust_remote_code"] for _, kw in seen] == [False, True]
    with pytest.raises(pytest.skip.Exception):
        backbone.load_backbone("org/ckpt", trust_remote_code=False)
    # A hub id loads local-first (elmm_ray/models/hub.py: the node's one download before
    # the stages), with the same safety arguments.
    assert seen[-1] == ("model", {"dtype": backbone.torch.float32, "use_safetensors": True,
                                  "trust_remote_code": False, "local_files_only": True})


DASHBOARD = re.compile(r"dashboard[-_]host\W+(0\.0\.0\.0)")


def test_cluster_files_never_bind_the_dashboard_to_every_interface():
    files = [p for p in (REPO_ROOT / "cluster").rglob("*") if p.is_file()]
    assert files
    exposed = [f"{p.relative_to(REPO_ROOT)}:{n}" for p in files
               for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
               if DASHBOARD.search(line)]
    assert not exposed


def test_local_ray_binds_loopback_and_a_refused_token_is_a_clean_error(monkeypatch, capsys):
    import ray

    from elmm_ray import cli, ray_session

    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        if kwargs.get("address"):
            raise ray.exceptions.AuthenticationError("Token authentication is enabled but "
                                                     "no authentication token was found")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-ray-token-0001")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_session.init_ray(RayConfig(num_cpus=2))
    assert calls[0]["dashboard_host"] == "127.0.0.1"
    assert calls[0]["_node_ip_address"] == "127.0.0.1"
    assert "secret-ray-token-0001" not in repr(calls[0])  # Ray reads it itself
    with pytest.raises(ConnectionError, match="refused this client: .*no authentication token"):
        ray_session.init_ray(RayConfig(address="ray://127.0.0.1:10001"))

    def refused(args):
        ray_session.init_ray(RayConfig(address="127.0.0.1:6379"))
        return 0

    monkeypatch.setattr(cli, "cmd_validate", refused)
    assert cli.main(["validate", "configs/demo.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the Ray cluster at 127.0.0.1:6379 refused") and (
        "Traceback" not in err)


def _token_home(tmp_path, monkeypatch, mode: int = 0o644) -> Path:
    """A temp HOME with ~/.ray/auth_token written the way Ray 2.60 writes it (umask 022)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("fake-ray-token-9c1d")
    token.chmod(mode)
    return token


def test_secure_token_file_makes_the_token_private(tmp_path, monkeypatch, caplog):
    import stat

    from elmm_ray.ray_session import secure_token_file

    token = _token_home(tmp_path, monkeypatch)
    assert stat.S_IMODE(token.stat().st_mode) == 0o644
    assert secure_token_file() == [token]
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert token.read_text() == "fake-ray-token-9c1d"
    assert secure_token_file() == []  # already private: nothing to do
    # RAY_AUTH_TOKEN_PATH names another file: both it and the default are made private.
    other = tmp_path / "elsewhere" / "token"
    other.parent.mkdir()
    other.write_text("t")
    other.chmod(0o664)
    token.chmod(0o640)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert secure_token_file() == [other, token]
    assert {stat.S_IMODE(p.stat().st_mode) for p in (other, token)} == {0o600}
    # An explicit path: only that file.
    other.chmod(0o644)
    token.chmod(0o644)
    assert secure_token_file(other) == [other]
    assert stat.S_IMODE(token.stat().st_mode) == 0o644
    assert "fake-ray-token-9c1d" not in caplog.text


def test_secure_token_file_missing_file_is_no_error(tmp_path, monkeypatch, caplog):
    from elmm_ray.ray_session import secure_token_file

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no" / "token"))
    with caplog.at_level(logging.WARNING):
        assert secure_token_file() == []
        assert secure_token_file(tmp_path / "missing") == []
    assert not caplog.records


def test_secure_token_file_warns_when_it_cannot(tmp_path, monkeypatch, caplog):
    import os

    from elmm_ray import ray_session

    token = _token_home(tmp_path, monkeypatch)

    def refuse(fd, mode):
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setattr(ray_session.os, "fchmod", refuse)
        assert ray_session.secure_token_file() == []
    assert "could not make the Ray token file" in caplog.text
    caplog.clear()
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        other_uid = os.geteuid() + 1
        m.setattr(ray_session.os, "geteuid", lambda: other_uid)
        assert ray_session.secure_token_file() == []
    assert "belongs to another user" in caplog.text
    assert token.stat().st_mode & 0o077  # left as it is
    assert ray_session.secure_token_file() == [token]


def test_init_ray_secures_the_token_after_a_local_start_and_before_joining(monkeypatch):
    import ray

    from elmm_ray import ray_session

    events = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: events.append(
        "join" if kw.get("address") else "local start"))
    monkeypatch.setattr(ray_session, "secure_token_file", lambda path=None: events.append(
        "secure"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_session, "_STARTED_HERE", {"local": False})
    ray_session.init_ray(RayConfig(num_cpus=1))
    ray_session.init_ray(RayConfig(address="127.0.0.1:6379"))
    assert events == ["local start", "secure", "secure", "join"]


SECRETS = {"WANDB_API_KEY": "fake-wandb-5f1c9e", "MLFLOW_TRACKING_TOKEN": "fake-mlflow-8a2b4d",
           "AWS_SECRET_ACCESS_KEY": "fake-aws-3c7e1f", "HF_TOKEN": "hf_fakeToken6d9a0b",
           "RAY_AUTH_TOKEN": "fake-ray-token-2e4f6a"}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_no_secret_from_the_environment_reaches_the_run_directory(tmp_path, monkeypatch,
                                                                  ray_session):
    from elmm_ray.cli import main

    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    assert main(["run", "configs/demo.yaml", f"run_dir={run_dir}", *TINY,
                 "train.backend=local", "train.epochs=1"]) == 0
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 20 and (run_dir / "config.yaml").is_file()
    assert any(p.parent.name == "logs" for p in files)
    leaks = [f"{p.relative_to(run_dir)}: {key}" for p in files for key, value in SECRETS.items()
             if value.encode() in p.read_bytes()]
    assert not leaks
