"""train.py / sample.py end to end on the toy world: config handling, bad input, resume == uninterrupted run,
gradient accumulation == large batch, two-process torchrun on CPU, and a playable streamed mp4."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

import toy
import train
import weighting

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch_size=2", "--ema_start=1", "--gen_every=2", "--evaluate=false"]


def final_weights(out: Path) -> dict:
    meta = train.latest_checkpoint(out)
    return load_file(str(out / meta["file"]))


def test_toy_preset_equals_embedded_defaults():
    preset = yaml.safe_load((ROOT / "configs" / "toy.yaml").read_text())
    defaults = dataclasses.asdict(train.Config())
    differ = {k: (v, defaults[k]) for k, v in preset.items() if (tuple(v) if isinstance(v, list) else v) != defaults[k]}
    assert not differ, f"configs/toy.yaml differs from the Config defaults (yaml, code): {differ}"
    assert set(preset) == set(defaults), f"toy.yaml misses {set(defaults) - set(preset)}"


def test_wan_presets_parse_and_keep_the_reference_numbers():
    for name in ("wan1.3b_dmd", "wan1.3b_re_dmd", "wan1.3b_stream_r1", "wan1.3b_stream_r1_teacher1.3b"):
        raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        cfg = train.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        assert (cfg.lr, cfg.lr_critic, cfg.betas, cfg.gen_every, cfg.guidance) == (2e-6, 4e-7, (0.0, 0.999), 5, 4.0), name
        assert (cfg.window_frames, cfg.sink_frames, cfg.ema_alpha, cfg.num_frames) == (9, 3, 0.999, 21), name


def test_overrides_are_typed_and_unknown_keys_rejected():
    cfg = train.load_config(["--max_steps=7", "--spatial=false", "--steps=1000,500", "--lr", "0.5"])
    assert (cfg.max_steps, cfg.spatial, cfg.steps, cfg.lr) == (7, False, (1000.0, 500.0), 0.5)
    with pytest.raises(SystemExit, match="unknown config key 'nope'"):
        train.load_config(["--nope=1"])
    with pytest.raises(SystemExit, match="expected a int"):
        train.load_config(["--max_steps=many"])


@pytest.mark.parametrize("args, message", [
    (["--height=30"], "must divide by 8"),
    (["--num_frames=10"], "not a multiple of chunk_frames"),
    (["--teacher_path=missing.safetensors"], "teacher_path: missing.safetensors does not exist"),
    (["--weighting=rlhf"], "weighting='rlhf': expected one of"),
])
def test_bad_input_fails_before_work(args, message):
    with pytest.raises(SystemExit, match=message):
        train.load_config(args)


def test_empty_prompt_file_is_an_error(tmp_path):
    (tmp_path / "p.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match="holds no prompt"):
        train.load_config([f"--prompt_file={tmp_path / 'p.txt'}"])


@pytest.mark.parametrize("spatial,temporal", [(True, True), (True, False), (False, True), (False, False)])
def test_stream_r1_component_flags_pick_the_documented_weight(spatial, temporal):
    """spatial + temporal: SR1's factorised W; spatial alone: its global-min-max W_s (frames keep their saliency);
    temporal alone: w_t only (flat within each frame); neither: exp(beta r) per rollout only."""
    cfg = train.load_config([f"--spatial={spatial}", f"--temporal={temporal}", "--balance=false"])
    w = SimpleNamespace(vae=toy.ToyVAE(), reward=toy.ToyReward())
    torch.manual_seed(0)
    x0 = 0.5 * torch.randn(2, cfg.num_frames, w.vae.z_dim, cfg.height // w.vae.spatial_factor,
                           cfg.width // w.vae.spatial_factor)
    prompts = toy.toy_prompts()[:2]
    weight, stats = train.reward_weight(cfg, x0, prompts, w, balancer=None)
    res = w.reward.score_and_saliency(w.vae.decode(x0), prompts, latent_shape=(x0.shape[1], *x0.shape[3:]),
                                      axes=train.AXES)
    inter = torch.exp(cfg.beta * res.z.mean(1))
    if not (spatial or temporal):
        assert weight.shape == (2,) and torch.allclose(weight, inter), "no component: exp(beta r) per rollout"
        return
    intra = weight / inter.view(-1, 1, 1, 1, 1)
    assert intra.shape == (2, cfg.num_frames, 1, *x0.shape[3:]) and torch.allclose(intra.mean((1, 2, 3, 4)),
                                                                                    torch.ones(2), atol=1e-5)
    fused = weighting.fuse_saliency(res.saliency, res.z)
    if spatial and temporal:
        assert torch.allclose(intra, weighting.intra_perplexity_weights(fused), atol=1e-5)
    elif spatial:
        lo, hi = fused.amin((1, 2, 3), keepdim=True), fused.amax((1, 2, 3), keepdim=True)
        ref = ((fused - lo) / (hi - lo)).clamp_min(cfg.spatial_floor)
        assert torch.allclose(intra[:, :, 0], ref / ref.mean((1, 2, 3), keepdim=True), atol=1e-5), \
            "spatial alone must be SR1's global min-max W_s"
    else:
        within = intra.flatten(2)
        assert torch.allclose(within.amin(2), within.amax(2), atol=1e-5) and intra.flatten(1).std(1).min() > 0, \
            "temporal alone: one weight per frame, not all equal"


def test_resume_is_bit_exact(tmp_path):
    """Stop after 2 steps, resume to 4 == one 4-step run: generator, EMA, critic, optimizer states, RNG, balancer."""
    a, b = tmp_path / "a", tmp_path / "b"
    train.main([f"--out_dir={a}", "--max_steps=4", "--ckpt_every=4", *FAST])
    train.main([f"--out_dir={b}", "--max_steps=2", "--ckpt_every=1", *FAST])
    train.main([f"--out_dir={b}", "--max_steps=4", "--ckpt_every=1", *FAST])
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    assert any(k.startswith("ema.") for k in wa) and any(k.startswith("opt.critic.") for k in wa)
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"


def test_resume_truncates_the_log_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "eval": {}}\n{"step": 3}\n{"step": 4, "gen_lo')  # killed mid-write
    train.truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "eval": {}}\n'


def test_teacher_stage_keeps_an_ema_and_exports_it(tmp_path):
    """Every stage keeps an EMA of what it trains: ema_k = d ema_(k-1) + (1 - d) net_k, and model.safetensors is the
    EMA (what the toy teacher asset ships)."""
    train.main([f"--out_dir={tmp_path}", "--stage=teacher", "--max_steps=3", "--ckpt_every=1", "--batch_size=2",
                "--ema_start=1", "--ema_decay=0.75"])
    prev, last = (load_file(str(tmp_path / f"step_{s:06d}.safetensors")) for s in (2, 3))
    ema, net = train.network_weights(last, "ema"), train.network_weights(last, "net")
    expected = {k: 0.75 * v + 0.25 * net[k] for k, v in train.network_weights(prev, "ema").items()}
    assert ema.keys() == net.keys() == expected.keys()
    assert all(torch.allclose(ema[k], expected[k], atol=1e-7) for k in ema), "EMA update is not d ema + (1-d) net"
    assert any(not torch.equal(ema[k], net[k]) for k in ema), "the EMA is a copy of the network"
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in ema) and exported.keys() == ema.keys()


def test_ode_pairs_are_reused_only_with_the_settings_that_made_them(tmp_path):
    ode = [f"--out_dir={tmp_path}", "--stage=ode", "--batch_size=2", "--ode_pairs=2", "--evaluate=false"]
    train.main(ode + ["--max_steps=1"])
    made = (tmp_path / "ode_pairs_rank0.safetensors").stat().st_mtime_ns
    train.main(ode + ["--max_steps=2"])  # resume: the same pairs, not regenerated
    assert (tmp_path / "ode_pairs_rank0.safetensors").stat().st_mtime_ns == made
    with pytest.raises(SystemExit, match="ode_guidance"):
        train.main(ode + ["--max_steps=3", "--ode_guidance=3.0"])


def test_non_finite_loss_skips_the_update_and_stops_when_it_repeats(tmp_path, monkeypatch):
    """A NaN generator loss: the update is skipped (weights unchanged, logged), and max_bad_steps in a row stop the run."""
    import dmd
    monkeypatch.setattr(dmd, "dmd_loss", lambda x0, g, weight=None: (x0 * float("nan")).mean())
    with pytest.raises(SystemExit, match="2 consecutive gen_loss updates skipped"):
        train.main([f"--out_dir={tmp_path}", "--max_steps=5", "--max_bad_steps=2", *FAST, "--gen_every=1",
                    "--weighting=none"])
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in logged] == [["gen_loss"]], f"expected one logged skipped step, got {logged}"
    assert "gen_grad_norm" not in logged[0] and "critic_grad_norm" in logged[0], "the critic still trains"


def test_non_finite_gradient_skips_the_generator_step_and_critic_steps_do_not_hide_it(tmp_path, monkeypatch):
    """A finite loss whose backward gives NaN: no optimizer step (the student stays finite and unchanged), and the
    run stops after max_bad_steps generator updates in a row although the critic updates in between are fine."""
    import dmd
    loss = dmd.dmd_loss

    def nan_gradient(x0, g, weight=None):
        x0.register_hook(lambda grad: grad * float("nan"))
        return loss(x0, g, weight)

    monkeypatch.setattr(dmd, "dmd_loss", nan_gradient)
    with pytest.raises(SystemExit, match="2 consecutive gen_loss updates skipped"):
        train.main([f"--out_dir={tmp_path}", "--max_steps=8", "--max_bad_steps=2", "--ckpt_every=1", *FAST,
                    "--gen_every=2", "--weighting=none"])
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in logged] == [["gen_loss"], None], f"got {logged}"
    assert math.isfinite(logged[0]["gen_loss"]) and math.isnan(logged[0]["gen_grad_norm"])
    start = load_file(train.Config.student_path)
    net = train.network_weights(final_weights(tmp_path), "net")
    assert all(torch.equal(net[k], start[k]) for k in start), "a NaN gradient must not change the student"


def test_gradient_accumulation_equals_large_batch():
    """k micro-batches of b (each loss / k) give the gradient of one batch of k*b, for the weighted DMD loss."""
    torch.manual_seed(0)
    cfg = train.load_config(["--weighting=stream_r1", "--balance=false"])
    w = train.World(cfg, torch.device("cpu"), 0, 1)
    student = train.build_net(cfg.model_size, cfg.student_path, w.device, causal=True)
    teacher = train.build_net(cfg.teacher_size, cfg.teacher_path, w.device).requires_grad_(False)
    critic = train.build_net(cfg.model_size, cfg.teacher_path, w.device).requires_grad_(False)
    balancer = None
    prompts = w.sample_prompts(4)
    noise, eps = torch.randn(2, 4, *w.latent_shape())
    t = torch.tensor([100.0, 400.0, 700.0, 950.0])
    grads = []  # exit step 0: the rollout draws no re-noising noise, so nothing depends on the batch split
    for split in ([slice(0, 4)], [slice(0, 2), slice(2, 4)]):
        student.zero_grad()
        for s in split:
            loss, _ = train.generator_loss(cfg, student, teacher, critic, w, prompts[s], noise[s], 0, t[s], eps[s],
                                           balancer)
            (loss / len(split)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    err = (grads[0] - grads[1]).abs().max() / grads[0].abs().max()
    assert err < 1e-5, f"accumulated gradient differs from the large-batch gradient by {err:.2e} (relative)"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_on_cpu(tmp_path, parallel):
    """Replicated (all-reduced gradients) and FSDP2-sharded training, checkpoint and evaluation across 2 gloo ranks;
    the EMA evaluated at step 1 then updated at step 2 (a frozen FSDP2 module must reshard after its forward); stop
    after 1 step and resume to 2 == the 2-step run (each rank's own RNG stream and balancer come back)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               f"--out_dir={out}", f"--max_steps={steps}", "--ckpt_every=1", f"--parallel={parallel}", *FAST,
               "--gen_every=1", f"--grad_checkpointing={parallel == 'fsdp'}", *extra]  # fsdp: as the Wan presets
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return run

    run = torchrun(tmp_path / "a", 2, "--evaluate=true", "--sample_every=1", "--ode_steps=4")  # 4-step teacher sampler
    assert "held-out eval" in run.stdout, "the final evaluation did not run on the sharded / replicated student"
    torchrun(tmp_path / "b", 1)
    torchrun(tmp_path / "b", 2)
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert train.latest_checkpoint(tmp_path / "b")["step"] == 2 and wa.keys() == wb.keys()
    assert not torch.equal(wa["rng.0.cpu"], wa["rng.1.cpu"]), "the two ranks must draw different streams"
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ after a 2-process resume, e.g. {differ[:3]}"


def _teacher_stage_worker(rank: int, out: str, port: int):
    """One rank of a 2-process teacher stage; records what each rank trains from at its first loss."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    loss = train.teacher_loss

    def recorded(cfg, net, w, prompts, videos):
        path = Path(out) / f"start_rank{rank}.pt"
        if not path.exists():
            torch.save({"net": net.state_dict(), "text": w.text.model.state_dict(), "videos": videos}, path)
        return loss(cfg, net, w, prompts, videos)

    train.teacher_loss = recorded
    train.main([f"--out_dir={out}", "--stage=teacher", "--max_steps=1", "--batch_size=2", "--text_path=",
                "--evaluate=false"])


def test_teacher_stage_ranks_start_from_the_same_random_init(tmp_path):
    """Replicated training of a randomly initialised network (the toy teacher and its text encoder): every rank must
    start from rank 0's weights, and draw its own data."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_teacher_stage_worker, args=(str(tmp_path), port), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"start_rank{r}.pt") for r in range(2))
    for part in ("net", "text"):
        differ = [k for k in r0[part] if not torch.equal(r0[part][k], r1[part][k])]
        assert not differ, f"{part}: {len(differ)} tensors differ between the ranks' starting weights, e.g. {differ[:3]}"
    assert not torch.equal(r0["videos"], r1["videos"]), "each rank must draw its own batch"


def test_sample_writes_a_playable_ten_second_mp4(tmp_path):
    import imageio.v3 as iio
    import sample
    out = tmp_path / "s.mp4"
    sample.main([f"--out={out}", "--seconds=10", "--upscale=2", f"--out_dir={tmp_path}"])
    frames = iio.imread(out)
    assert frames.shape[0] >= 160 and frames.shape[-1] == 3, f"mp4 has shape {frames.shape}"


def test_sample_reads_a_step_checkpoint_as_ckpt_without_a_student_init(tmp_path, capsys):
    """--ckpt step_N.safetensors (train.py's own format) == sampling that run's out_dir: the same EMA, the same video;
    and --ckpt needs no student_path on disk."""
    import imageio.v3 as iio
    import sample
    run = tmp_path / "run"
    train.main([f"--out_dir={run}", "--max_steps=2", "--ckpt_every=1", *FAST])
    step = run / train.latest_checkpoint(run)["file"]
    videos = {}
    for name, args in {"auto": [f"--out_dir={run}"],
                       "ckpt": [f"--ckpt={step}", f"--out_dir={tmp_path / 'none'}", "--student_path=missing.pt"]}.items():
        sample.main(args + [f"--out={tmp_path / name}.mp4", "--frames=12", "--upscale=1"])
        videos[name] = iio.imread(tmp_path / f"{name}.mp4")
    printed = capsys.readouterr().out
    assert f"student: {step} (ema)" in printed, printed
    assert videos["auto"].shape[0] >= 12 and (videos["auto"] == videos["ckpt"]).all(), "--ckpt sampled another model"
