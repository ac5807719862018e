"""The whole pipeline on CPU with a tiny DiT: teacher checkpoint → trajectories → ARD training → sampling
→ evaluation samples.

The teacher is a random-initialised DiT-tiny/2 (8×8 latents, 10 classes). Its adaLN-Zero output
layer predicts ε = 0, so every trajectory is the deterministic line x_t = √(ᾱ_t/ᾱ_T)·x_T and every
x0-prediction is x_T/√ᾱ_T: a fixed target the student can learn, which makes "the loss falls"
a sharp check of the training loop rather than of the teacher.
"""

import json

import torch
from safetensors.torch import load_file, save_file

from ard_kernels import samples, train, trajectories
from ard_kernels.diffusion import DDIMSampler
from ard_kernels.models import ARDiT, DiT
from ard_kernels.training import TrajectoryDataset


def test_teacher_to_trajectories_to_training_to_sampling(tmp_path):
    torch.manual_seed(0)
    teacher = DiT("DiT-tiny/2", input_size=8, num_classes=10)
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))

    # 1. trajectories from the checkpoint (K = 4: x0-predictions at 25-step indices 15, 10, 5 and the sample)
    data = tmp_path / "traj"
    assert trajectories.main(["--model", "DiT-tiny/2", "--ckpt", str(tmp_path / "teacher.safetensors"),
                              "--num", "8", "--out", str(data), "--shard-size", "5", "--batch-size", "8",
                              "--input-size", "8", "--num-classes", "10", "--no-progress"]) == 0
    ds = TrajectoryDataset(data)
    assert len(ds) == 8 and ds.K == 4
    item = ds[3]
    a_T = float(DDIMSampler(25).alphas_cumprod[-1])
    torch.testing.assert_close(item["targets"], (item["x_T"] / a_T ** 0.5).expand(4, -1, -1, -1),
                               rtol=1e-4, atol=1e-3)

    # 2. a few dozen full-batch steps from the teacher's weights: the loss falls
    out = tmp_path / "run"
    assert train.main(["--model", "DiT-tiny/2", "--data", str(data), "--out", str(out), "--init-from",
                       str(tmp_path / "teacher.safetensors"), "--steps", "30", "--batch-size", "8",
                       "--history-layers", "2", "--lr", "3e-3", "--log-every", "1", "--ckpt-every", "30",
                       "--seed", "0", "--no-progress"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, (first, last)

    # 3. the trained student samples in K = 4 cached steps
    student = ARDiT("DiT-tiny/2", history_layers=2, steps=4, input_size=8, num_classes=10).eval()
    student.load_state_dict(load_file(str(out / "checkpoints" / "step-0000030" / "model.safetensors")))
    noise, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 4, 9])
    final, states = student.sample(noise, y, return_states=True)
    assert final.shape == (3, 4, 8, 8) and states.shape[:2] == (3, 4) and torch.isfinite(states).all()
    # step 0 sees only x_T, in training as in sampling: it moved towards the teacher's x_T ↦ x_T/√ᾱ_T
    # (the student's heads start at zero; later steps read the student's own, still rough, outputs)
    target = noise / a_T ** 0.5
    assert (states[:, 0] - target).square().mean() < 0.9 * target.square().mean()

    # 4. evaluation samples straight from the checkpoint directory: EMA weights, N and pattern from its state.json
    ckpt = out / "checkpoints" / "step-0000030"
    assert samples.main(["--ckpt", str(ckpt), "--num", "3", "--out", str(tmp_path / "samples"), "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert (manifest["steps"], manifest["history_layers"], manifest["num"]) == (4, 2, 3)
    ema = ARDiT("DiT-tiny/2", history_layers=2, steps=4, input_size=8, num_classes=10).eval()
    ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    cfg = samples.SampleConfig(**{k: v for k, v in manifest.items() if k != "shards"})
    noise, labels = samples.shard_inputs(cfg, 0, 3)
    got = load_file(str(tmp_path / "samples" / "samples-000000.safetensors"))
    torch.testing.assert_close(got["latents"], ema.sample(noise, labels), rtol=1e-5, atol=1e-5)
    assert torch.equal(got["labels"], labels)
