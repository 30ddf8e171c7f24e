"""Native (orbax) checkpoints: conversion, restore in place on a mesh, the CLI, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from pijax.config import DType
from pijax.model.hf_io import CheckpointError, save_hf_checkpoint
from pijax.model.loader import convert_checkpoint, load_model
from pijax.model.native import MARKER_FILE
from pijax.model.tokenizer import ByteTokenizer, Tokenizer
from pijax.testing import (
    assert_trees_equal,
    dense_logits,
    make_tokenizer_json,
    random_params,
    tiny_model_config,
)

REPO = Path(__file__).resolve().parents[2]
CFG = tiny_model_config()  # 4 kv heads: a 4-way model axis divides it


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("orbax")
    tok = make_tokenizer_json(root / "tok", add_bos=True)
    return save_hf_checkpoint(CFG, random_params(CFG, seed=7), tok, root / "hf", "float32")


@pytest.fixture(scope="module")
def native_dir(hf_dir):
    return convert_checkpoint(hf_dir, hf_dir.parent / "native", "float32")


def test_convert_writes_layout(native_dir):
    names = {p.name for p in native_dir.iterdir()}
    assert names == {
        MARKER_FILE,
        "params",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
    }
    marker = json.loads((native_dir / MARKER_FILE).read_text())
    assert marker["dtype"] == "float32"
    assert marker["params"]["layers.1.self_attn.q_proj.kernel"] == [64, 64]


def test_native_equals_hf(hf_dir, native_dir, mesh1):
    hf = load_model(hf_dir, dtype="float32", mesh=mesh1)
    nat = load_model(native_dir, dtype="float32", mesh=mesh1)
    assert nat.config == hf.config and nat.eos_token_ids == hf.eos_token_ids
    assert isinstance(nat.tokenizer, Tokenizer)
    assert nat.tokenizer.encode("claim 12 €") == hf.tokenizer.encode("claim 12 €")
    assert_trees_equal(nat.params, hf.params)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, size=(1, 9))
    np.testing.assert_array_equal(
        dense_logits(nat.graphdef, nat.params, tokens), dense_logits(hf.graphdef, hf.params, tokens)
    )


def test_restore_casts_to_requested_dtype(hf_dir, native_dir, mesh1):
    hf = load_model(hf_dir, dtype="float32", mesh=mesh1)
    nat = load_model(native_dir, dtype=DType.BFLOAT16, mesh=mesh1)
    assert_trees_equal(nat.params, hf.params, dtype=jnp.bfloat16)


def test_bfloat16_native_checkpoint(tmp_path, hf_dir, mesh1):
    out = convert_checkpoint(hf_dir, tmp_path / "bf16", "bfloat16")
    hf = load_model(hf_dir, dtype="bfloat16", mesh=mesh1)
    assert_trees_equal(load_model(out, dtype="bfloat16", mesh=mesh1).params, hf.params)


def test_byte_tokenizer_survives_conversion(tmp_path, mesh1):
    src = save_hf_checkpoint(CFG, random_params(CFG, seed=1), None, tmp_path / "hf")
    out = convert_checkpoint(src, tmp_path / "native", "float32")
    assert not (out / "tokenizer.json").exists()
    assert isinstance(load_model(out, dtype="float32", mesh=mesh1).tokenizer, ByteTokenizer)


def test_convert_refuses_to_clobber(tmp_path, hf_dir, native_dir):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(
        CheckpointError, match="other: output exists, is not empty and is not a native checkpoint"
    ):
        convert_checkpoint(hf_dir, other)
    assert (other / "keep.txt").read_text() == "precious"
    out = Path(shutil.copytree(native_dir, tmp_path / "native"))
    with pytest.raises(CheckpointError, match="a native checkpoint exists; pass overwrite"):
        convert_checkpoint(hf_dir, out)
    convert_checkpoint(hf_dir, out, "bfloat16", overwrite=True)
    assert json.loads((out / MARKER_FILE).read_text())["dtype"] == "bfloat16"


def _marker(edit):
    def apply(path: Path):
        marker = json.loads((path / MARKER_FILE).read_text())
        (path / MARKER_FILE).write_text(json.dumps(edit(marker)))

    return apply


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


Q1 = "layers.1.self_attn.q_proj.kernel"
BAD_NATIVE = [
    (
        "marker_not_json",
        lambda p: (p / MARKER_FILE).write_text("{"),
        rf"{MARKER_FILE}: not valid JSON",
    ),
    (
        "marker_version",
        _marker(lambda m: {**m, "version": 99}),
        rf"{MARKER_FILE}: format='pijax-orbax-params' version=99 is not supported",
    ),
    (
        "marker_missing_param",
        _marker(lambda m: {**m, "params": _without(m["params"], Q1)}),
        rf"{MARKER_FILE}: parameter '{Q1}' is missing",
    ),
    (
        "marker_wrong_shape",
        _marker(lambda m: {**m, "params": {**m["params"], Q1: [64, 32]}}),
        rf"{MARKER_FILE}: parameter '{Q1}' has shape \[64, 32\]; expected \[64, 64\]",
    ),
    (
        "marker_extra_param",
        _marker(lambda m: {**m, "params": {**m["params"], "extra.kernel": [1]}}),
        rf"{MARKER_FILE}: parameters \['extra.kernel'\] are not in the model",
    ),
    (
        "params_missing",
        lambda p: shutil.rmtree(p / "params"),
        r"params: orbax params directory not found",
    ),
    (
        "params_corrupt",
        lambda p: [f.unlink() for f in (p / "params").rglob("*") if f.is_file()],
        r"params: cannot restore orbax checkpoint",
    ),
    ("config_missing", lambda p: (p / "config.json").unlink(), r"config\.json: file not found"),
]


@pytest.mark.parametrize("edit, match", [c[1:] for c in BAD_NATIVE], ids=[c[0] for c in BAD_NATIVE])
def test_bad_native_checkpoint(tmp_path, native_dir, mesh1, edit, match):
    path = Path(shutil.copytree(native_dir, tmp_path / "bad"))
    edit(path)
    with pytest.raises(CheckpointError, match=match):
        load_model(path, dtype="float32", mesh=mesh1)


@pytest.mark.slow
def test_cli(tmp_path, hf_dir):
    script = str(REPO / "scripts" / "convert_checkpoint.py")
    out = tmp_path / "cli"
    run = subprocess.run(
        [sys.executable, script, f"--input={hf_dir}", f"--output={out}", "--dtype=bfloat16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads((out / MARKER_FILE).read_text())["dtype"] == "bfloat16"
    bad = subprocess.run(
        [sys.executable, script, f"--input={tmp_path / 'missing'}", f"--output={tmp_path / 'x'}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode != 0
    assert "missing: no such checkpoint directory" in bad.stderr


# Runs in a fresh interpreter: the device count must be set before JAX initializes.
_MESH_SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    import jax, numpy as np
    from pijax.model.loader import load_model
    from pijax.sharding import make_mesh, param_shardings
    from pijax.model.llama import LOGICAL_AXES
    from pijax.model.hf_io import path_names
    from pijax.testing import dense_logits

    hf_dir, native_dir, scratch = sys.argv[1:4]
    assert jax.device_count() == 4, jax.devices()
    ref = load_model(hf_dir, dtype="float32", mesh=make_mesh((1, 1)))
    tokens = np.random.default_rng(0).integers(0, ref.config.vocab_size, size=(2, 13))
    ref_logits = dense_logits(ref.graphdef, ref.params, tokens)
    ref_flat = {".".join(map(str, path_names(p))): np.asarray(v)
                for p, v in jax.tree_util.tree_leaves_with_path(ref.params)}
    report = {}
    for shape in [(1, 4), (2, 2)]:
        mesh = make_mesh(shape)
        lm = load_model(native_dir, dtype="float32", mesh=mesh)
        want = param_shardings(lm.params, mesh, LOGICAL_AXES)
        leaves = jax.tree_util.tree_leaves_with_path(lm.params)
        params = {}
        for (path, x), s in zip(leaves, jax.tree.leaves(want), strict=True):
            name = ".".join(map(str, path_names(path)))
            params[name] = dict(
                sharding_ok=x.sharding == s,
                spec=[None if a is None else str(a) for a in x.sharding.spec],
                devices=sorted(d.id for d in x.sharding.device_set),
                shard_shapes=sorted({tuple(sh.data.shape) for sh in x.addressable_shards}),
                equal=bool(np.array_equal(np.asarray(x), ref_flat[name])))
        logits = dense_logits(lm.graphdef, lm.params, tokens)
        report[str(shape)] = dict(
            params=params,
            max_logit_diff=float(np.abs(logits - ref_logits).max()),
            logit_scale=float(np.abs(ref_logits).max()),
            same_argmax=bool((logits.argmax(-1) == ref_logits.argmax(-1)).all()))
    # A model axis that neither divides the kv heads nor is a multiple of them is refused,
    # naming the field (2 kv heads on 4 devices would be replicated, 3 cannot be).
    bad = shutil.copytree(native_dir, scratch)
    cfg = json.load(open(bad + "/config.json"))
    cfg["num_key_value_heads"] = 3
    cfg["num_attention_heads"] = 12
    json.dump(cfg, open(bad + "/config.json", "w"))
    try:
        load_model(bad, dtype="float32", mesh=make_mesh((1, 4)))
        report["bad_mesh_error"] = None
    except ValueError as e:
        report["bad_mesh_error"] = str(e)
    print("REPORT" + json.dumps(report))
""")


@pytest.mark.slow
def test_restore_on_4_device_mesh(tmp_path, hf_dir, native_dir):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _MESH_SCRIPT,
            str(hf_dir),
            str(native_dir),
            str(tmp_path / "bad_mesh"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("REPORT"))
    report = json.loads(line[len("REPORT") :])
    for shape, devices_on_model in (("(1, 4)", 4), ("(2, 2)", 2)):
        r = report[shape]
        for name, p in r["params"].items():
            assert p["sharding_ok"], (shape, name, p["spec"])
            assert p["equal"], (shape, name)
            assert p["devices"] == [0, 1, 2, 3], (shape, name)
        # Tensor-parallel leaves really are split: one shard per model-axis device.
        q = r["params"]["layers.0.self_attn.q_proj.kernel"]
        assert q["spec"] == [None, "model"]
        assert q["shard_shapes"] == [[64, 64 // devices_on_model]]
        down = r["params"]["layers.1.mlp.down_proj.kernel"]
        assert down["shard_shapes"] == [[128 // devices_on_model, 64]]
        assert r["params"]["norm.weight"]["shard_shapes"] == [[64]]  # replicated
        # Same weights; the sharded contraction may sum in another order.
        assert r["max_logit_diff"] <= 1e-5 * r["logit_scale"], r["max_logit_diff"]
        assert r["same_argmax"]
    assert "num_key_value_heads=3" in report["bad_mesh_error"]
    assert "config.json" in report["bad_mesh_error"]
