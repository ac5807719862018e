"""``python -m ard_kernels.samples``: student samples for evaluation, sharded, resumable, decoded, packed.

A tiny ARDiT with random weights stands in for a trained student; its "training checkpoint
directory" holds different model and EMA weights, so reading the wrong ones shows.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from _model_helpers import randomize
from safetensors import safe_open
from safetensors.torch import save_file

from ard_kernels import _shards, samples
from ard_kernels.diffusion import DDIMSampler
from ard_kernels.models import ARDiT, DiT
from ard_kernels.sampling import decode, to_uint8_images

TINY = dict(input_size=8, num_classes=10)


def _student(seed, history_layers=2, steps=4):
    torch.manual_seed(seed)
    return randomize(ARDiT("DiT-tiny/2", history_layers=history_layers, steps=steps, **TINY), std=0.1)


@pytest.fixture
def checkpoint(tmp_path):
    """OUT/checkpoints/step-0000010 as train.py writes it: model, EMA, state.json with the run's args."""
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000010"
    ckpt.mkdir(parents=True)
    save_file(_student(1).state_dict(), str(ckpt / "model.safetensors"))
    save_file(_student(2).state_dict(), str(ckpt / "ema.safetensors"))
    args = {"model": "DiT-tiny/2", "history_layers": 2, "pattern": "causal", "t_max": 999.0, "lr": 1e-4}
    (ckpt / "state.json").write_text(json.dumps({"step": 10, "ema_updates": 10, "args": args}))
    return ckpt


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _cli(ckpt, out, *extra):
    return samples.main(["--ckpt", str(ckpt), "--out", str(out), "--no-progress", *extra])


def test_cli_shards_hold_the_students_samples(checkpoint, tmp_path):
    out = tmp_path / "samples"
    assert _cli(checkpoint, out, "--num", "7", "--shard-size", "3", "--batch-size", "2", "--labels", "balanced") == 0
    manifest = _shards.load_manifest(out, samples.SCHEMA, "python -m ard_kernels.samples")
    assert [s["num"] for s in manifest["shards"]] == [3, 3, 1]
    assert (manifest["steps"], manifest["history_layers"], manifest["pattern"]) == (4, 2, "causal")
    assert manifest["checkpoint"] == str((checkpoint / "ema.safetensors").resolve())
    cfg = samples.SampleConfig(**{k: v for k, v in manifest.items() if k != "shards"})
    ema = _student(2)
    for j, n in cfg.shards():
        shard = _read(cfg.shard_path(out, j))
        assert set(shard) == {"latents", "labels"}
        noise, labels = samples.shard_inputs(cfg, j, n)
        torch.testing.assert_close(shard["labels"], (j * 3 + torch.arange(n)) % 10)  # balanced
        assert torch.equal(shard["labels"], labels)
        want = ema.sample(noise, labels)
        torch.testing.assert_close(shard["latents"], want, rtol=1e-5, atol=1e-5)
        assert shard["latents"].abs().max() > 0.1  # a real sample, not a zero head


def test_weights_and_checkpoint_args_are_the_ones_asked_for(checkpoint, tmp_path):
    student, source = samples.load_student(checkpoint, weights="model")
    assert source == checkpoint / "model.safetensors"
    assert (student.steps, student.history_layers, student.pattern) == (4, 2, "causal")
    for name, p in _student(1).state_dict().items():
        assert torch.equal(student.state_dict()[name], p), name
    ema, _ = samples.load_student(checkpoint, history_layers=1, pattern="window")  # arguments win
    assert (ema.history_layers, ema.pattern) == (1, "window")
    assert torch.equal(ema.final_layer3.linear.weight, _student(2).final_layer3.linear.weight)


def test_a_bare_state_dict_needs_history_layers_and_gives_k_from_its_heads(tmp_path):
    path = tmp_path / "student.safetensors"
    save_file(_student(3, history_layers=1, steps=3).state_dict(), str(path))
    with pytest.raises(ValueError, match="history_layers"):
        samples.load_student(path)
    student, _ = samples.load_student(path, history_layers=1)
    assert (student.steps, student.history_layers, student.input_size, student.num_classes) == (3, 1, 8, 10)
    with pytest.raises(ValueError, match="state.json"):
        samples.load_student(tmp_path)  # a directory that is not a training checkpoint
    with pytest.raises(FileNotFoundError, match="does not exist"):
        samples.load_student(tmp_path / "missing.safetensors", history_layers=1)


def test_rerun_skips_finished_shards_and_refuses_another_config(checkpoint, tmp_path):
    out = tmp_path / "samples"
    assert _cli(checkpoint, out, "--num", "4", "--shard-size", "2") == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("samples-*.safetensors")}
    assert len(stamps) == 2
    (out / "samples-000001.safetensors").unlink()  # as if killed before the last shard
    assert _cli(checkpoint, out, "--num", "4", "--shard-size", "2") == 0
    assert (out / "samples-000000.safetensors").stat().st_mtime_ns == stamps["samples-000000.safetensors"]
    assert (out / "samples-000001.safetensors").exists()
    with pytest.raises(ValueError, match="different config"):
        _cli(checkpoint, out, "--num", "4", "--shard-size", "2", "--cfg-scale", "1.5")


def test_ranks_make_the_same_samples_as_one_process(checkpoint, tmp_path):
    student, source = samples.load_student(checkpoint)
    cfg = samples.SampleConfig(checkpoint=str(source), num=5, steps=4, history_layers=2, pattern="causal",
                               t_max=999.0, input_size=8, in_channels=4, num_classes=10, shard_size=2)

    def make(j, n, on_batch):
        return samples.make_shard(student, cfg, j, n, batch_size=3, on_batch=on_batch)

    one, two = tmp_path / "one", tmp_path / "two"
    _shards.make_shards(cfg, one, make, progress=False)
    mine = [_shards.make_shards(cfg, two, make, rank=r, world_size=2, progress=False) for r in (0, 1)]
    assert [[p.name for p in m] for m in mine] == [["samples-000000.safetensors", "samples-000002.safetensors"],
                                                   ["samples-000001.safetensors"]]
    _shards.write_manifest(cfg, two)
    for j, _ in cfg.shards():
        a, b = _read(cfg.shard_path(one, j)), _read(cfg.shard_path(two, j))
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["latents"], b["latents"])


def test_uint8_images_follow_dits_rounding():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    got = to_uint8_images(x)
    assert got.shape == (1, 1, 6, 3) and got.dtype == torch.uint8
    assert got[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]


def test_npz_without_vae_is_refused(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="--vae"):
        _cli(checkpoint, tmp_path / "s", "--num", "2", "--npz")


@pytest.fixture
def tiny_vae_dir(tmp_path):
    if importlib.util.find_spec("diffusers") is None:
        if os.environ.get("ARD_KERNELS_REQUIRE_TEST_DEPS") == "1":
            raise ImportError("tests/test_samples.py needs diffusers, a test requirement")
        pytest.skip("diffusers is not installed (pip install -r requirements-dev.txt)")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    path = tmp_path / "vae"
    vae.save_pretrained(str(path))
    return path


def test_vae_decodes_to_images_and_npz_packs_them_in_order(checkpoint, tmp_path, tiny_vae_dir):
    out = tmp_path / "samples"
    assert _cli(checkpoint, out, "--num", "5", "--shard-size", "2", "--batch-size", "3", "--vae", str(tiny_vae_dir),
                "--npz") == 0
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tiny_vae_dir)).eval()
    cfg = samples.SampleConfig(**{k: v for k, v in json.loads((out / "manifest.json").read_text()).items()
                                  if k != "shards"})
    assert cfg.image_size == 16  # two levels: one 2× upsampling of the 8² latents
    shards = [_read(cfg.shard_path(out, j)) for j, _ in cfg.shards()]
    for shard in shards:
        assert shard["images"].dtype == torch.uint8 and shard["images"].shape[1:] == (16, 16, 3)
        want = to_uint8_images(decode(vae, shard["latents"]))
        # one uint8 step of slack: the CLI decoded in batches of 3 and 2, this in one batch
        assert (shard["images"].int() - want.int()).abs().max() <= 1
        assert shard["images"].float().std() > 1.0  # not a constant image
    packed = np.load(out / "samples.npz")
    assert packed.files == ["arr_0"]
    arr = packed["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, torch.cat([s["images"] for s in shards]).numpy())


def test_teacher_samples_are_its_ddim_samples(tmp_path):
    """--teacher: the DiT checkpoint's guided DDIM (1.5 by default), in the same files, seeds and labels."""
    torch.manual_seed(4)
    teacher = randomize(DiT("DiT-tiny/2", **TINY), std=0.05)
    path = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), str(path))
    out = tmp_path / "teacher_samples"
    assert samples.main(["--teacher", "--ckpt", str(path), "--steps", "5", "--num", "3", "--out", str(out),
                         "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["sampler"], manifest["steps"], manifest["cfg_scale"], manifest["history_layers"]) == \
        ("ddim", 5, 1.5, None)
    cfg = samples.SampleConfig(**{k: v for k, v in manifest.items() if k != "shards"})
    noise, labels = samples.shard_inputs(cfg, 0, 3)
    want, _ = DDIMSampler(5).sample(teacher, noise, labels, 1.5, record_indices=[0], num_classes=10)
    got = _read(cfg.shard_path(out, 0))["latents"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unguided, _ = DDIMSampler(5).sample(teacher, noise, labels, 1.0, record_indices=[0], num_classes=10)
    assert not torch.allclose(got, unguided, atol=1e-4)  # the guidance did act
    with pytest.raises(SystemExit, match="--cuda-graphs"):
        samples.main(["--teacher", "--cuda-graphs", "--ckpt", str(path), "--num", "1", "--out", str(out)])


def test_batch_size_and_precision_are_checked_and_recorded(checkpoint, tmp_path, capsys):
    out = tmp_path / "samples"
    for bad in ("0", "-1"):  # -1 once left the latents unwritten and marked the shard done
        with pytest.raises(SystemExit):
            _cli(checkpoint, out, "--num", "2", "--batch-size", bad)
        assert "--batch-size: expected >= 1" in capsys.readouterr().err
    student, source = samples.load_student(checkpoint)
    cfg = samples.SampleConfig(checkpoint=str(source), num=2, steps=4, history_layers=2, pattern="causal",
                               t_max=999.0, input_size=8, in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="batch_size"):
        samples.make_shard(student, cfg, 0, 2, batch_size=-1)
    assert _cli(checkpoint, out, "--num", "2") == 0
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp32"
    with pytest.raises(ValueError, match="different config"):  # bf16 samples do not join fp32 ones
        _cli(checkpoint, out, "--num", "2", "--precision", "bf16")
