"""Teacher trajectories: shard schema, determinism over batch size and ranks, resume, checks, dataset, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from ard_kernels.diffusion import DDIMSampler
from ard_kernels.models import DiT
from ard_kernels.training import TrajectoryDataset, teacher_forced_states
from ard_kernels.trajectories import (
    TrajectoryConfig,
    generate,
    main,
    shard_inputs,
    shard_path,
    verify_shard,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = DiT("DiT-tiny/2", input_size=8, num_classes=10).eval()
    with torch.no_grad():  # DiT's zero-initialised output would make every trajectory x_T / √ᾱ_T
        for head in (model.final_layer.linear, model.final_layer.adaLN_modulation[-1]):
            head.weight.normal_(std=0.02)
    return model


def cfg_for(num=7, shard_size=3, **kw):
    base = dict(model="DiT-tiny/2", num=num, shard_size=shard_size, steps=6, record_indices=[4, 2, 1, 0],
                input_size=8, num_classes=10, seed=3)
    return TrajectoryConfig(**(base | kw))


def load_all(out, cfg):
    return [load_file(str(shard_path(out, j))) for j, _ in cfg.shards()]


def test_shards_schema_and_teacher_agreement(teacher, tmp_path):
    cfg = cfg_for()
    paths = generate(teacher, cfg, tmp_path, batch_size=2, progress=False)
    assert [p.name for p in paths] == ["shard-000000.safetensors", "shard-000001.safetensors",
                                       "shard-000002.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    shards = load_all(tmp_path, cfg)
    assert [s["x_T"].shape[0] for s in shards] == [3, 3, 1]
    s = shards[1]
    assert s["targets"].shape == (3, 4, 4, 8, 8) and s["targets"].dtype == torch.float32
    assert s["labels"].dtype == torch.int64 and int(s["labels"].max()) < 10
    noise, labels = shard_inputs(cfg, 1, 3)
    torch.testing.assert_close(s["x_T"], noise)
    assert torch.equal(s["labels"], labels)
    # the batch split (2) does not change the result: one call on the whole shard agrees
    final, rec = DDIMSampler(6).sample(teacher, noise, labels, 1.5, [4, 2, 1, 0])
    torch.testing.assert_close(s["targets"], rec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s["targets"][:, -1], final)
    # different shards draw different noise
    assert not torch.allclose(shards[0]["x_T"], shards[1]["x_T"])


def test_ranks_split_shards_and_match_one_process(teacher, tmp_path):
    cfg = cfg_for(num=5, shard_size=2)
    mine0 = generate(teacher, cfg, tmp_path / "two", rank=0, world_size=2, progress=False)
    mine1 = generate(teacher, cfg, tmp_path / "two", rank=1, world_size=2, progress=False)
    assert [p.name[-17:-12] for p in mine0] == ["00000", "00002"] and [p.name[-17:-12] for p in mine1] == ["00001"]
    generate(teacher, cfg, tmp_path / "one", batch_size=5, progress=False)
    for a, b in zip(load_all(tmp_path / "two", cfg), load_all(tmp_path / "one", cfg)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_resume_skips_finished_and_redoes_broken(teacher, tmp_path):
    cfg = cfg_for()
    generate(teacher, cfg, tmp_path, progress=False)
    p0, p1, p2 = (shard_path(tmp_path, j) for j in range(3))
    os.utime(p0, (1, 1))
    p1.unlink()
    p2.write_bytes(p2.read_bytes()[:100])  # a truncated file (a crash without the atomic rename)
    generate(teacher, cfg, tmp_path, progress=False)
    assert p0.stat().st_mtime == 1  # untouched
    for j, n in cfg.shards():
        verify_shard(shard_path(tmp_path, j), cfg, j, n)
    with pytest.raises(ValueError, match="different config"):
        generate(teacher, cfg_for(cfg_scale=4.0), tmp_path, progress=False)


def test_verify_catches_non_finite(teacher, tmp_path):
    from safetensors.torch import save_file

    cfg = cfg_for(num=2, shard_size=2)
    generate(teacher, cfg, tmp_path, progress=False)
    path = shard_path(tmp_path, 0)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    t["targets"][0, 0, 0, 0, 0] = float("nan")
    save_file(t, str(path), metadata=meta)
    with pytest.raises(ValueError, match="finite"):
        verify_shard(path, cfg, 0, 2)
    with pytest.raises(ValueError, match="shape"):
        verify_shard(path, cfg, 0, 3)


def test_dataset_and_distributed_sampler(teacher, tmp_path):
    cfg = cfg_for(dtype="bfloat16")
    generate(teacher, cfg, tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="manifest"):
        TrajectoryDataset(tmp_path)
    write_manifest(cfg, tmp_path)
    lazy, mem = TrajectoryDataset(tmp_path), TrajectoryDataset(tmp_path, in_memory=True)
    assert len(lazy) == 7 and lazy.K == 4 and lazy.input_size == 8
    shards = load_all(tmp_path, cfg)
    for i, (s, r) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]):
        a, b = lazy[i], mem[i]
        assert a["targets"].dtype == torch.float32 and a["label"].dtype == torch.int64
        torch.testing.assert_close(a["targets"], shards[s]["targets"][r].float())
        for key in a:
            torch.testing.assert_close(a[key], b[key])
    with pytest.raises(IndexError):
        lazy[7]
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(lazy, num_replicas=2, rank=rank, shuffle=True, seed=0)
        for batch in DataLoader(lazy, batch_size=2, sampler=sampler, num_workers=1):
            seen += batch["label"].tolist()
            states = teacher_forced_states(batch["x_T"], batch["targets"])
            assert states.shape == (len(batch["label"]), 4, 4, 8, 8)
            torch.testing.assert_close(states[:, 0], batch["x_T"])
            torch.testing.assert_close(states[:, 1:], batch["targets"][:, :3])
    assert len(seen) == 8  # 7 samples, padded to 8 by the sampler


def test_cli_in_process(tmp_path, capsys):
    argv = ["--model", "DiT-tiny/2", "--random-init", "--num", "3", "--out", str(tmp_path), "--shard-size", "2",
            "--steps", "4", "--record-indices", "2,1,0", "--input-size", "8", "--num-classes", "10",
            "--record", "xt", "--no-progress"]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["K"] == 3 and manifest["record"] == "xt" and [s["num"] for s in manifest["shards"]] == [2, 1]
    assert "wrote 3 samples" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(argv + ["--ckpt", "x.pt"])  # --ckpt and --random-init exclude each other
    capsys.readouterr()
    with pytest.raises(SystemExit):  # -1 once made no teacher call and wrote the empty targets as a shard
        main([str(tmp_path / "bad") if a == str(tmp_path) else a for a in argv] + ["--batch-size", "-1"])
    assert "--batch-size: expected >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_under_torchrun(tmp_path):
    """Two ranks: each writes its shards, rank 0 writes the manifest after a gloo barrier."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "ard_kernels.trajectories", "--model", "DiT-tiny/2", "--random-init", "--num-samples", "3",
           "--out", str(tmp_path), "--shard-size", "1", "--steps", "3", "--record-indices", "1,0",
           "--input-size", "8", "--num-classes", "10", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [f"shard-00000{j}.safetensors" for j in range(3)]
