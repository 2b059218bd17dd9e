"""train.py / sample.py end to end on the toy world: typed config and bad input, the EMA, clipping, gradient
accumulation and the Re-DMD / critic wiring through the loop, checkpoints (keep-last-2, damaged ones skipped, a kill
mid-write), resume == uninterrupted run and its config check, DDP / FSDP2 across two CPU processes, and sampling."""
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

import checkpoint
import config
import dmd
import toy
import train
import weighting

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch_size=2", "--ema_start=1", "--gen_every=2", "--evaluate=false"]  # generator updates at steps 1, 3, ..


def step_weights(out: Path, step: int | None = None) -> dict:
    """The tensors of checkpoint `step` in `out` (default: the newest)."""
    step = checkpoint.latest_checkpoint(out)["step"] if step is None else step
    return load_file(str(out / f"step_{step:06d}.safetensors"))


def differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys(), f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}"
    return [k for k in a if not torch.equal(a[k], b[k])]


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """One uninterrupted FAST run of 4 steps with a checkpoint after each (the last two kept); read-only for tests."""
    out = tmp_path_factory.mktemp("four_steps")
    train.main([f"--out_dir={out}", "--max_steps=4", "--ckpt_every=1", *FAST])
    return out


# --------------------------------------------------------------------------------------------- config
def test_toy_preset_equals_embedded_defaults():
    preset = yaml.safe_load((ROOT / "configs" / "toy.yaml").read_text())
    cfg = config.Config(**{k: config.typed(k, v, config.FIELDS[k]) for k, v in preset.items()})
    assert cfg == config.Config(), "configs/toy.yaml differs from the Config defaults"
    assert set(preset) == set(config.FIELDS), f"toy.yaml misses {set(config.FIELDS) - set(preset)}"


def test_wan_presets_parse_and_keep_the_reference_numbers():
    for name in ("wan1.3b_dmd", "wan1.3b_re_dmd", "wan1.3b_stream_r1", "wan1.3b_stream_r1_teacher1.3b"):
        raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        cfg = config.Config(**{k: config.typed(k, v, config.FIELDS[k]) for k, v in raw.items()})
        assert (cfg.lr, cfg.lr_critic, cfg.betas, cfg.gen_every, cfg.guidance) == (2e-6, 4e-7, (0.0, 0.999), 5, 4.0), name
        assert (cfg.window_frames, cfg.sink_frames, cfg.ema_alpha, cfg.num_frames) == (9, 3, 0.999, 21), name
        assert cfg.critic_path and cfg.student_path, f"{name}: every network's init is explicit"


def test_overrides_are_typed_and_unknown_keys_rejected():
    cfg = config.load_config(["--max_steps=7", "--spatial=false", "--steps=1000,500", "--lr", "0.5"])
    assert (cfg.max_steps, cfg.spatial, cfg.steps, cfg.lr) == (7, False, (1000.0, 500.0), 0.5)
    with pytest.raises(SystemExit, match="unknown config key 'nope'"):
        config.load_config(["--nope=1"])
    with pytest.raises(SystemExit, match="max_steps='many': expected an integer"):
        config.load_config(["--max_steps=many"])


def test_yaml_values_go_through_the_same_typed_parsing(tmp_path):
    """PyYAML reads `1e-4` as text and a quoted 'false' as a non-empty string: both must mean what they say."""
    preset = tmp_path / "c.yaml"
    preset.write_text("lr: 1e-4\nspatial: 'false'\nsteps: [1000, 500]\nmax_steps: '12'\n")
    cfg = config.load_config([f"--config={preset}", "--ema_decay", "0.5"])
    assert (cfg.lr, cfg.spatial, cfg.steps, cfg.max_steps, cfg.ema_decay) == (1e-4, False, (1000.0, 500.0), 12, 0.5)
    assert isinstance(cfg.lr, float)
    for text, message in [("max_steps: ten", "max_steps='ten': expected an integer"),
                          ("spatial: maybe", "spatial='maybe': expected true or false"),
                          ("lr: fast", "lr='fast': expected a number"), ("batch_size: 2.5", "batch_size=2.5")]:
        preset.write_text(text)
        with pytest.raises(SystemExit, match=re.escape(message)):
            config.load_config(["--config", str(preset)])


@pytest.mark.parametrize("args, message", [
    (["--height=30"], "height=30, width=32: expected multiples of 8"),
    (["--num_frames=10"], "num_frames=10: expected a multiple of chunk_frames=3"),
    (["--teacher_path=missing.safetensors"], "teacher_path='missing.safetensors': expected an existing file"),
    (["--critic_path="], "critic_path='': expected an existing file or folder (the dmd stage reads it)"),
    (["--weighting=rlhf"], "weighting='rlhf': expected one of"),
    (["--model_size=7b"], "model_size='7b': expected one of ('toy', '1.3b', '14b')"),
    (["--grad_accum=0"], "grad_accum=0: expected >= 1"),
    (["--gen_every=0"], "gen_every=0: expected >= 1"),
    (["--ckpt_every=0"], "ckpt_every=0: expected >= 1"),
    (["--batch_size=0"], "batch_size=0: expected >= 1"),
    (["--steps=1000,0"], "steps=(1000.0, 0.0): expected times in (0, 1000]"),
    (["--steps=1200,500"], "steps=(1200.0, 500.0): expected times in (0, 1000]"),
    (["--sink_frames=2"], "window_frames=9, sink_frames=2, ema_alpha=0.99, chunk_frames=3: EMA-sink fuses"),
    (["--stage=ode", "--ode_steps=8"], "ode_steps=8"),
    (["--teacher_chunk_frames=5"], "teacher_chunk_frames=5: expected 0 with world='toy' (the pretrained Wan teacher is "
                                   "bidirectional), else a divisor of num_frames=12"),
    (["--teacher_chunk_frames=-1"], "teacher_chunk_frames=-1: expected >= 0"),
])
def test_bad_input_fails_before_work(args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        config.load_config(args)


def test_empty_prompt_file_is_an_error(tmp_path):
    (tmp_path / "p.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match="holds no prompt"):
        config.load_config([f"--prompt_file={tmp_path / 'p.txt'}"])


# --------------------------------------------------------------------------------------------- the DMD step
@pytest.mark.parametrize("spatial,temporal", [(True, True), (True, False), (False, True), (False, False)])
def test_stream_r1_component_flags_pick_the_documented_weight(spatial, temporal):
    """spatial + temporal: SR1's factorised W; spatial alone: its global-min-max W_s (frames keep their saliency);
    temporal alone: w_t only (flat within each frame); neither: exp(beta r) per rollout only."""
    cfg = config.load_config([f"--spatial={spatial}", f"--temporal={temporal}", "--balance=false"])
    parts = SimpleNamespace(vae=toy.ToyVAE(), reward=toy.ToyReward())
    torch.manual_seed(0)
    x0 = 0.5 * torch.randn(2, cfg.num_frames, parts.vae.z_dim, cfg.height // parts.vae.spatial_factor,
                           cfg.width // parts.vae.spatial_factor)
    prompts = toy.toy_prompts()[:2]
    weight, stats = train.reward_weight(cfg, x0, prompts, parts, balancer=None)
    res = parts.reward.score_and_saliency(parts.vae.decode(x0), prompts, latent_shape=(x0.shape[1], *x0.shape[3:]))
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


def spy_draws(monkeypatch) -> list:
    """Record every draw_inputs of the loop (the real draws, handed on): generator micro-steps first on its steps."""
    draws, draw = [], train.draw_inputs
    monkeypatch.setattr(train, "draw_inputs", lambda cfg, parts: draws.append(draw(cfg, parts)) or draws[-1])
    return draws


def test_re_dmd_weights_the_generator_loss_by_exp_beta_z_mq(tmp_path, monkeypatch):
    """weighting=re_dmd through the loop: the weight dmd_loss receives is exp(beta z_MQ) of the decoded rollout, per
    sample (Reward Forcing's Re-DMD), with the toy reward's MQ z of the generator's own prompts."""
    seen, loss = [], dmd.dmd_loss
    monkeypatch.setattr(dmd, "dmd_loss", lambda x0, g, weight=None: seen.append((x0.detach(), weight)) or loss(x0, g,
                                                                                                               weight))
    draws = spy_draws(monkeypatch)
    train.main([f"--out_dir={tmp_path}", "--max_steps=1", "--weighting=re_dmd", "--beta=1.5", *FAST])
    (x0, weight), = seen
    res = toy.ToyReward().score_and_saliency(toy.ToyVAE().decode(x0), draws[0][0])
    want = torch.exp(1.5 * res.z[:, res.axes.index("MQ")])
    assert weight.shape == (2,) and torch.allclose(weight, want, rtol=1e-5), f"weight {weight} != exp(beta z_MQ) {want}"


def test_critic_trains_on_a_fresh_rollout_of_the_updated_student(tmp_path, monkeypatch):
    """The critic's x0 is a new no-grad rollout of the student after its generator update, from the critic's own
    draws, not the generator's rollout (exit step 0, so the rollout is a function of the drawn noise)."""
    generated, critic_inputs, dmd_loss, critic_loss = [], [], dmd.dmd_loss, dmd.critic_loss
    monkeypatch.setattr(dmd, "dmd_loss", lambda x0, g, w=None: generated.append(x0.detach()) or dmd_loss(x0, g, w))
    monkeypatch.setattr(dmd, "critic_loss", lambda c, x0, t, eps, ctx: critic_inputs.append(x0) or critic_loss(
        c, x0, t, eps, ctx))
    monkeypatch.setattr(dmd, "sample_exit_step", lambda num_steps, device, generator=None: 0)
    draws = spy_draws(monkeypatch)
    train.main([f"--out_dir={tmp_path}", "--max_steps=1", "--ckpt_every=1", "--weighting=none", *FAST])
    (x0,), (gen_x0,) = critic_inputs, generated
    cfg = config.load_config([])
    parts = config.Components(cfg, torch.device("cpu"))
    student = config.build_net(cfg.model_size, "", parts.device, causal=True, chunk_frames=cfg.chunk_frames)
    student.load_state_dict(checkpoint.network_weights(step_weights(tmp_path), "net"))
    prompts, noise = draws[1][:2]
    with torch.no_grad():
        want = dmd.self_forcing_rollout(student, noise, parts.context(prompts), dmd.warped_steps(cfg.steps, cfg.shift),
                                        0, cfg.cache_options())
    assert not x0.requires_grad and not torch.allclose(x0, gen_x0), "the critic must not reuse the generator's rollout"
    assert torch.allclose(x0, want, atol=1e-5), f"critic x0 is not a rollout of the updated student: " \
                                                f"{(x0 - want).abs().max():.2e}"


def test_long_tuning_supervises_a_num_frames_window_of_the_long_rollout(tmp_path, monkeypatch):
    """rollout_frames > num_frames through the loop: the student rolls out s + num_frames frames (s a chunk boundary
    drawn per micro-step) and teacher, critic and the DMD loss see exactly its last num_frames frames."""
    graded, critic_inputs, dmd_gradient, critic_loss = [], [], dmd.dmd_gradient, dmd.critic_loss
    monkeypatch.setattr(dmd, "dmd_gradient", lambda x0, *a: graded.append(x0.detach()) or dmd_gradient(x0, *a))
    monkeypatch.setattr(dmd, "critic_loss", lambda c, x0, t, eps, ctx: critic_inputs.append(x0) or critic_loss(
        c, x0, t, eps, ctx))
    monkeypatch.setattr(dmd, "sample_exit_step", lambda num_steps, device, generator=None: 0)
    starts = iter([9, 3])
    monkeypatch.setattr(dmd, "sample_window_start", lambda rollout, window, chunk, device: next(starts))
    draws = spy_draws(monkeypatch)
    cfg = config.load_config(["--rollout_frames=21", "--weighting=none"])
    train.main([f"--out_dir={tmp_path}", "--max_steps=1", "--rollout_frames=21", "--weighting=none", *FAST])
    assert [d[1].shape[1] for d in draws] == [9 + cfg.num_frames, 3 + cfg.num_frames], "rollout lengths"
    parts = config.Components(cfg, torch.device("cpu"))
    student = config.build_net(cfg.model_size, cfg.student_path, parts.device, causal=True,
                               chunk_frames=cfg.chunk_frames)
    with torch.no_grad():  # the generator's rollout comes from the initial student (exit step 0: no other draws)
        prompts, noise = draws[0][:2]
        want = dmd.self_forcing_rollout(student, noise, parts.context(prompts), dmd.warped_steps(cfg.steps, cfg.shift),
                                        0, cfg.cache_options())
    (x0,), (critic_x0,) = graded, critic_inputs
    assert x0.shape[1] == critic_x0.shape[1] == cfg.num_frames, "teacher and critic must see num_frames frames"
    assert torch.allclose(x0, want[:, 9:], atol=1e-5), f"the DMD window is not the rollout's last frames: " \
                                                      f"{(x0 - want[:, 9:]).abs().max():.2e}"
    with pytest.raises(SystemExit, match="rollout_frames=20"):
        config.load_config(["--rollout_frames=20"])


def test_ema_moves_only_after_taken_generator_updates(tmp_path, monkeypatch):
    """FAST: generator updates at steps 1 and 3, critic-only steps 2 and 4, the EMA made at step 1. After the
    generator update at 3, ema = d ema_2 + (1 - d) net_3; the critic-only step 4 leaves it (net_4 == net_3 != ema_3,
    so an update there would move it)."""
    monkeypatch.setattr(checkpoint, "save_checkpoint", functools.partial(checkpoint.save_checkpoint, keep=10))
    train.main([f"--out_dir={tmp_path}", "--max_steps=4", "--ckpt_every=1", "--ema_decay=0.5", *FAST])
    ema, net = ({s: checkpoint.network_weights(step_weights(tmp_path, s), name) for s in (2, 3, 4)}
                for name in ("ema", "net"))
    assert not differing(net[4], net[3]), "a critic-only step changed the generator"
    assert differing(ema[3], net[3]), "the EMA equals the generator: the test could not see an update"
    assert not differing(ema[4], ema[3]), "the EMA moved on a step without a generator update"
    assert all(torch.allclose(ema[3][k], 0.5 * ema[2][k] + 0.5 * net[3][k], atol=1e-7) for k in ema[3]), \
        "after a generator update the EMA must be d ema + (1 - d) net"


def test_a_skipped_generator_update_leaves_the_ema(tmp_path, monkeypatch):
    """The EMA from step 0; the generator update at step 1 is taken, the one at step 3 skipped (a NaN gradient): at
    step 4 the EMA is still d init + (1 - d) net_1, not moved again toward the unchanged generator."""
    loss, calls = dmd.dmd_loss, itertools.count()

    def nan_gradient_after_the_first(x0, g, weight=None):
        if next(calls):
            x0.register_hook(lambda grad: grad * float("nan"))
        return loss(x0, g, weight)

    monkeypatch.setattr(dmd, "dmd_loss", nan_gradient_after_the_first)
    train.main([f"--out_dir={tmp_path}", "--max_steps=4", "--ckpt_every=1", *FAST, "--ema_start=0", "--ema_decay=0.5",
                "--weighting=none"])
    logged = [json.loads(line).get("skipped") for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == [None, None, ["generator"], None], logged
    init, last = load_file(config.Config.student_path), step_weights(tmp_path, 4)
    ema, net = checkpoint.network_weights(last, "ema"), checkpoint.network_weights(last, "net")
    assert all(torch.allclose(ema[k], 0.5 * init[k] + 0.5 * net[k], atol=1e-7) for k in init), \
        "the EMA moved after a skipped generator update"


def test_teacher_stage_keeps_an_ema_and_exports_it(tmp_path):
    """Every stage keeps an EMA of what it trains: ema_k = d ema_(k-1) + (1 - d) net_k, and model.safetensors is the
    EMA (what the toy teacher asset ships)."""
    train.main([f"--out_dir={tmp_path}", "--stage=teacher", "--max_steps=3", "--ckpt_every=1", "--batch_size=2",
                "--ema_start=1", "--ema_decay=0.75"])
    prev, last = step_weights(tmp_path, 2), step_weights(tmp_path, 3)
    ema, net = checkpoint.network_weights(last, "ema"), checkpoint.network_weights(last, "net")
    expected = {k: 0.75 * v + 0.25 * net[k] for k, v in checkpoint.network_weights(prev, "ema").items()}
    assert ema.keys() == net.keys() == expected.keys()
    assert all(torch.allclose(ema[k], expected[k], atol=1e-7) for k in ema), "EMA update is not d ema + (1-d) net"
    assert any(not torch.equal(ema[k], net[k]) for k in ema), "the EMA is a copy of the network"
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in ema) and exported.keys() == ema.keys()


@pytest.mark.parametrize("stage", ["teacher", "dmd"])
def test_teacher_chunk_frames_makes_the_teacher_and_the_critic_block_causal(tmp_path, monkeypatch, stage):
    """--teacher_chunk_frames=k builds the trained teacher (teacher stage), or the frozen teacher and the critic (dmd),
    block-causal over chunks of k frames: a chunk's output does not depend on later frames. The student is unchanged."""
    built, build_net = [], train.build_net
    monkeypatch.setattr(train, "build_net", lambda *a, **k: built.append(build_net(*a, **k)) or built[-1])
    stage_args = ["--stage=teacher", "--text_path=", "--batch_size=2"] if stage == "teacher" else FAST
    train.main([f"--out_dir={tmp_path}", "--max_steps=1", "--teacher_chunk_frames=3", *stage_args])
    teachers = built[:1] + built[2:] if stage == "dmd" else built  # dmd builds teacher, student, critic
    assert [(n.causal, n.chunk_frames) for n in teachers] == [(True, 3)] * len(teachers)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 12, 48, 8, 8, generator=gen), torch.randn(1, 8, 32, generator=gen)
    later = x.clone()
    later[:, 3:] = torch.randn(1, 9, 48, 8, 8, generator=gen)
    with torch.no_grad():
        a, b = (teachers[0](v, torch.full((1,), 500.0), ctx) for v in (x, later))
    assert torch.equal(a[:, :3], b[:, :3]) and not torch.equal(a[:, 3:], b[:, 3:]), "the teacher's first chunk sees later frames"


def test_the_toy_teacher_is_frame_causal_and_every_wan_teacher_bidirectional():
    """The toy default builds its teacher and critic frame-causal (README: the toy teacher learns the arrow of time);
    every Wan preset keeps the pretrained bidirectional teacher, and a causal one with world=wan is refused."""
    import bench
    assert config.teacher_mask(config.load_config([])) == dict(causal=True, chunk_frames=1)
    presets = sorted((ROOT / "configs").glob("wan*.yaml"))
    assert presets and all(config.teacher_mask(bench.plan_config(str(p))) == {} for p in presets)
    with pytest.raises(SystemExit, match="teacher_chunk_frames=1: expected 0 with world='wan'"):
        config.validate_config(config.Config(world="wan", teacher_chunk_frames=1))


def test_gradients_are_clipped_to_clip(tmp_path):
    """Through the loop with clip far below the real gradient norms: AdamW's first moment (beta1 = 0: the applied
    gradient) has norm exactly `clip` for the generator and the critic, while the logged pre-clip norms are larger."""
    clip = 1e-3
    train.main([f"--out_dir={tmp_path}", "--max_steps=1", f"--clip={clip}", "--betas=0.0,0.999", *FAST])
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    tensors = step_weights(tmp_path)
    for name, key in (("net", "gen_grad_norm"), ("critic", "critic_grad_norm")):
        moment = torch.cat([v.flatten() for k, v in tensors.items()
                            if k.startswith(f"opt.{name}.") and k.endswith(".exp_avg")])
        assert logged[key] > 10 * clip, f"{name}: gradient norm {logged[key]} is not above clip"
        assert math.isclose(moment.norm().item(), clip, rel_tol=1e-4), \
            f"{name}: applied gradient norm {moment.norm().item():.3g}, clip {clip}"


def test_gradient_accumulation_equals_large_batch(tmp_path, monkeypatch):
    """grad_accum=2 micro-batches of 2 == one batch of 4, through train.main: the generator's and the critic's
    applied gradients after one step (AdamW's first moment with beta1 = 0). The loop's draws are fixed
    ones, sliced per micro-batch, with exit step 0 (the rollout then draws nothing else)."""
    torch.manual_seed(0)
    cfg = config.Config()
    lat = (cfg.num_frames, toy.ToyVAE.z_dim, cfg.height // toy.ToyVAE.spatial_factor,
           cfg.width // toy.ToyVAE.spatial_factor)
    prompts = [toy.toy_prompts()[i] for i in (0, 9, 18, 27)]
    pools = [(prompts, torch.randn(4, *lat), torch.tensor([100.0, 400.0, 700.0, 950.0]), torch.randn(4, *lat))
             for _ in ("generator", "critic")]
    runs = {}
    for name, args in {"batch": ["--batch_size=4"], "accum": ["--batch_size=2", "--grad_accum=2"]}.items():
        calls = itertools.count()

        def fixed(cfg, parts, calls=calls):
            i, k, b = next(calls), cfg.grad_accum, cfg.batch_size
            p, noise, t, eps = pools[i // k % 2]
            s = slice(i % k * b, (i % k + 1) * b)
            return p[s], noise[s], 0, t[s], eps[s]

        monkeypatch.setattr(train, "draw_inputs", fixed)
        train.main([f"--out_dir={tmp_path / name}", "--max_steps=1", "--gen_every=1", "--evaluate=false",
                    "--weighting=stream_r1", "--balance=false", "--clip=1e9", "--betas=0.0,0.999", *args])
        runs[name] = step_weights(tmp_path / name)
    for name in ("net", "critic"):  # not the weights: Adam's first step is about lr * sign(g), ill-conditioned near 0
        keys = [k for k in runs["batch"] if k.startswith(f"opt.{name}.") and k.endswith(".exp_avg")]
        a, b = (torch.cat([runs[r][k].flatten() for k in keys]) for r in ("batch", "accum"))
        err = (a - b).abs().max() / a.abs().max()
        assert err < 1e-4, f"{name}: grad_accum=2 x 2 differs from batch 4 by {err:.2e} (relative)"


# --------------------------------------------------------------------------------------------- non-finite updates
def test_non_finite_loss_skips_the_update_and_stops_when_it_repeats(tmp_path, monkeypatch):
    """A NaN generator loss: the update is skipped (weights unchanged, logged), and max_bad_steps in a row stop the run."""
    monkeypatch.setattr(dmd, "dmd_loss", lambda x0, g, weight=None: (x0 * float("nan")).mean())
    with pytest.raises(SystemExit, match="2 consecutive generator updates skipped"):
        train.main([f"--out_dir={tmp_path}", "--max_steps=5", "--max_bad_steps=2", *FAST, "--gen_every=1",
                    "--weighting=none"])
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in logged] == [["generator"]], f"expected one logged skipped step, got {logged}"
    assert math.isnan(logged[0]["gen_grad_norm"]) and math.isfinite(logged[0]["critic_grad_norm"]), \
        "the critic still trains"


def test_non_finite_saliency_skips_the_update_instead_of_stopping_one_rank(tmp_path, monkeypatch):
    """A NaN saliency (bf16 reward gradients can overflow): NaN weights, so the loss is NaN and the update is skipped
    as for any non-finite loss (every rank decides alike), not a ValueError on the rank that saw it."""
    fuse = weighting.fuse_saliency
    monkeypatch.setattr(weighting, "fuse_saliency", lambda *a, **k: fuse(*a, **k) * float("nan"))
    with pytest.raises(SystemExit, match="2 consecutive generator updates skipped"):
        train.main([f"--out_dir={tmp_path}", "--max_steps=5", "--max_bad_steps=2", *FAST, "--gen_every=1"])
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in logged] == [["generator"]], f"expected one logged skipped step, got {logged}"


def test_process_group_binds_the_rank_gpu_first_and_waits_long_enough(monkeypatch):
    """torchrun on CUDA: this rank's GPU is set before the NCCL group is made, and given to it with its index; the
    collectives wait an hour (NCCL's default 10 min is less than rank 0 writing a Wan checkpoint alone)."""
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(config.dist, "init_process_group", lambda *a, **k: calls.append(("init", a, k)))
    monkeypatch.setattr(config.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(config.dist, "get_world_size", lambda: 8)
    cuda1 = torch.device("cuda", 1)
    assert config.setup_distributed() == (1, 8, cuda1)
    assert calls == [("set_device", cuda1), ("init", ("nccl",), {"timeout": config.timedelta(hours=1),
                                                                 "device_id": cuda1})], calls


def test_non_finite_gradient_skips_the_generator_step_and_critic_steps_do_not_hide_it(tmp_path, monkeypatch):
    """A finite loss whose backward gives NaN: no optimizer step (the student stays finite and unchanged), and the
    run stops after max_bad_steps generator updates in a row although the critic updates in between are fine."""
    loss = dmd.dmd_loss

    def nan_gradient(x0, g, weight=None):
        x0.register_hook(lambda grad: grad * float("nan"))
        return loss(x0, g, weight)

    monkeypatch.setattr(dmd, "dmd_loss", nan_gradient)
    with pytest.raises(SystemExit, match="2 consecutive generator updates skipped"):
        train.main([f"--out_dir={tmp_path}", "--max_steps=8", "--max_bad_steps=2", "--ckpt_every=1", *FAST,
                    "--gen_every=2", "--weighting=none"])
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in logged] == [["generator"], None], f"got {logged}"
    assert math.isfinite(logged[0]["gen_loss"]) and math.isnan(logged[0]["gen_grad_norm"])
    start = load_file(config.Config.student_path)
    net = checkpoint.network_weights(step_weights(tmp_path), "net")
    assert all(torch.equal(net[k], start[k]) for k in start), "a NaN gradient must not change the student"


# --------------------------------------------------------------------------------------------- checkpoints, resume
def test_a_resume_may_change_only_the_bookkeeping_fields():
    """Issue 14's resume rule: max_steps, ckpt_every, sample_every, evaluate (and where the run lives, the
    override itself, activation checkpointing, the bad-step limit) may change; a change of any other Config field
    (weighting and its parameters, learning rates, shapes, seeds, networks, ...) is reported by config_changes,
    which train.main refuses without allow_config_change."""
    cfg = config.load_config([])
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))
    free = {k for k in config.FIELDS if not config.config_changes(cfg, {**saved, k: "another value"})}
    assert free == {"max_steps", "ckpt_every", "sample_every", "evaluate", "out_dir", "allow_config_change",
                    "grad_checkpointing", "max_bad_steps"}, f"fields a resume may change silently: {sorted(free)}"


def test_resume_is_bit_exact(tmp_path, four_steps):
    """Stop after 2 steps, resume to 4 == one 4-step run: generator, EMA, critic, optimizer states, RNG, balancer."""
    train.main([f"--out_dir={tmp_path}", "--max_steps=2", "--ckpt_every=1", *FAST])
    train.main([f"--out_dir={tmp_path}", "--max_steps=4", "--ckpt_every=1", *FAST])
    wa, wb = step_weights(four_steps), step_weights(tmp_path)
    assert any(k.startswith("ema.") for k in wa) and any(k.startswith("opt.critic.") for k in wa)
    differ = differing(wa, wb)
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"


def test_resume_truncates_the_log_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "eval": {}}\n{"step": 3}\n{"step": 4, "gen_lo')  # killed mid-write
    checkpoint.truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "eval": {}}\n'


def test_checkpoints_keep_the_last_two_and_damaged_ones_are_skipped(tmp_path, four_steps):
    """Only steps 3 and 4 are on disk; a truncated or garbled newest checkpoint falls back to step 3 with a warning
    naming it (and training resumes from there to the same step 4); all damaged is an error, not a fresh start."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    assert sorted(p.name for p in run.glob("step_*")) == [
        "step_000003.json", "step_000003.safetensors", "step_000004.json", "step_000004.safetensors"]
    newest = run / "step_000004.safetensors"
    os.truncate(newest, newest.stat().st_size // 2)
    with pytest.warns(UserWarning, match="step_000004.json"):
        assert checkpoint.latest_checkpoint(run)["step"] == 3
    with pytest.warns(UserWarning, match="step_000004.json"):
        train.main([f"--out_dir={run}", "--max_steps=4", "--ckpt_every=1", *FAST])
    assert not differing(step_weights(run, 4), step_weights(four_steps, 4)), "resuming from step 3 gave another step 4"
    (run / "step_000004.json").write_text('{"step": 4, "fi')
    with pytest.warns(UserWarning, match="step_000004.json"):
        assert checkpoint.latest_checkpoint(run)["step"] == 3
    (run / "step_000003.safetensors").unlink()
    with pytest.raises(SystemExit, match="no intact checkpoint.*step_000004.json.*step_000003.json"):
        checkpoint.latest_checkpoint(run)
    assert checkpoint.latest_checkpoint(tmp_path / "empty") is None


KILLED_MID_WRITE = """
import os, signal, sys
import checkpoint
save_file = checkpoint.save_file
def half_then_kill(tensors, path):  # the step-3 checkpoint: half its bytes on disk, then SIGKILL
    save_file(tensors, path)
    if "step_000003" in path:
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = half_then_kill
import train
train.main(sys.argv[1:])
"""


def test_kill_during_a_checkpoint_write_then_resume_is_bit_exact(tmp_path, four_steps):
    """SIGKILL while step 3's checkpoint is half written: step 2 stays the newest, and resuming to 4 gives the
    uninterrupted run's step 4 bit for bit, with one log line per step."""
    args = [f"--out_dir={tmp_path}", "--max_steps=4", "--ckpt_every=1", *FAST]
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, *args], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())), timeout=300)  # same sums
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "step_000003.safetensors.tmp").exists() and checkpoint.latest_checkpoint(tmp_path)["step"] == 2
    train.main(args)
    differ = differing(step_weights(four_steps, 4), step_weights(tmp_path, 4))
    assert not differ, f"{len(differ)} tensors differ after a kill mid-write and a resume, e.g. {differ[:3]}"
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps


def test_resume_with_another_lr_is_refused_unless_allowed_then_applied(tmp_path, four_steps):
    """A resume may change bookkeeping (max_steps) freely; --lr=0.5 is refused with the diff, and with
    allow_config_change it is the optimizer's lr (not the checkpoint's 1e-4) and logged. Step 5 is a generator step."""
    shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
    args = [f"--out_dir={tmp_path}", "--max_steps=5", "--ckpt_every=1", *FAST, "--lr=0.5"]
    with pytest.raises(SystemExit, match=re.escape("lr: 0.0001 -> 0.5") + ".*allow_config_change=true"):
        train.main(args)
    train.main(args + ["--allow_config_change=true"])
    meta = json.loads((tmp_path / "step_000005.json").read_text())
    assert meta["opt_groups"]["net"][0]["lr"] == 0.5 and meta["opt_groups"]["critic"][0]["lr"] == 2e-4
    before, after = (checkpoint.network_weights(step_weights(tmp_path, s), "net") for s in (4, 5))
    moved = max((after[k] - before[k]).abs().max().item() for k in after)
    assert moved > 0.05, f"the generator moved at most {moved:.2g} in a step at lr 0.5: the old lr was used"
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"step": 4, "config_change": {"lr": [0.0001, 0.5]}} in logged


def test_ode_pairs_are_reused_only_with_the_settings_that_made_them(tmp_path):
    ode = [f"--out_dir={tmp_path}", "--stage=ode", "--batch_size=2", "--ode_pairs=2", "--evaluate=false"]
    train.main(ode + ["--max_steps=1"])
    made = (tmp_path / "ode_pairs_rank0.safetensors").stat().st_mtime_ns
    train.main(ode + ["--max_steps=2"])  # resume: the same pairs, not regenerated
    assert (tmp_path / "ode_pairs_rank0.safetensors").stat().st_mtime_ns == made
    with pytest.raises(SystemExit, match="ode_pairs_rank0.safetensors holds ODE pairs made with.*ode_guidance"):
        train.main(ode + ["--max_steps=3", "--ode_guidance=3.0", "--allow_config_change=true"])


# --------------------------------------------------------------------------------------------- two processes
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_on_cpu(tmp_path, parallel):
    """DDP and FSDP2-sharded training, checkpoint and evaluation across 2 gloo ranks; the EMA evaluated at step 1 then
    updated at step 2 (a frozen FSDP2 module must reshard after its forward); resuming the step-1 checkpoint to step
    2 == the 2-step run (each rank's own RNG stream and balancer come back). fsdp runs the Wan presets' path (bf16,
    gradient checkpointing): its losses are within 10 % of the same run's in fp32, and not equal to them (measured
    0.2-1.3 %)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")  # a crash prints every thread's stack
    fsdp = parallel == "fsdp"

    def torchrun(out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               f"--out_dir={out}", f"--max_steps={steps}", "--ckpt_every=1", f"--parallel={parallel}", *FAST,
               "--gen_every=1", f"--grad_checkpointing={fsdp}", f"--bf16={fsdp}", "--ode_steps=4", *extra]
        before = set(out.iterdir()) if out.exists() else set()
        for attempt in (1, 2):  # CI saw a rank abort (SIGABRT) once in ~10 launches, never here: one clean retry
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            if run.returncode == 0 or "Signal 6 (SIGABRT)" not in run.stderr or attempt == 2:
                break
            crash = run.stderr.find("Fatal Python error")
            warnings.warn(f"a torchrun rank aborted; retrying once. Its stacks: {run.stderr[crash:crash + 4000]}")
            for f in set(out.iterdir()) - before:
                f.unlink()
        crash = run.stderr.find("Fatal Python error")  # a rank's own stacks, not only torchrun's summary
        assert run.returncode == 0, run.stderr[crash:crash + 6000] if crash >= 0 else run.stderr[-3000:]
        return run

    run = torchrun(tmp_path / "a", 2, "--evaluate=true", "--sample_every=1")  # ode_steps 4: the eval teacher sampler
    assert "held-out eval" in run.stdout, "the final evaluation did not run on the sharded / replicated student"
    (tmp_path / "b").mkdir()
    for name in ("step_000001.json", "step_000001.safetensors", "log.jsonl"):
        shutil.copy(tmp_path / "a" / name, tmp_path / "b" / name)
    torchrun(tmp_path / "b", 2)
    wa, wb = step_weights(tmp_path / "a"), step_weights(tmp_path / "b")
    assert checkpoint.latest_checkpoint(tmp_path / "b")["step"] == 2
    assert not torch.equal(wa["rng.0.cpu"], wa["rng.1.cpu"]), "the two ranks must draw different streams"
    differ = differing(wa, wb)
    assert not differ, f"{len(differ)} tensors differ after a 2-process resume, e.g. {differ[:3]}"
    if fsdp:
        torchrun(tmp_path / "fp32", 2, "--bf16=false")
        losses = {name: [(r["gen_loss"], r["critic_loss"]) for r in map(json.loads, (tmp_path / name / "log.jsonl")
                                                                       .read_text().splitlines()) if "eval" not in r]
                  for name in ("a", "fp32")}
        pairs = [(a, b) for step_a, step_b in zip(losses["a"], losses["fp32"]) for a, b in zip(step_a, step_b)]
        assert len(pairs) == 4 and all(abs(a - b) < 0.1 * abs(b) for a, b in pairs), f"bf16 vs fp32 losses: {pairs}"
        assert any(a != b for a, b in pairs), f"bf16 losses equal fp32's: bf16 is not on ({pairs})"


def _ddp_worker(rank: int, out: str, port: int):
    """One rank of a 2-process DDP run with grad_accum 2; saves its own networks at every checkpoint."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    save = checkpoint.save_checkpoint

    def recorded(folder, step, nets, *args, **kwargs):
        torch.save({k: n.state_dict() for k, n in nets.items() if n is not None}, Path(out) / f"rank{rank}_{step}.pt")
        return save(folder, step, nets, *args, **kwargs)

    checkpoint.save_checkpoint = recorded
    train.main([f"--out_dir={out}", "--max_steps=3", "--ckpt_every=3", *FAST, "--gen_every=1", "--grad_accum=2"])


def test_ddp_ranks_hold_bit_identical_weights(tmp_path):
    """Replicated training: ranks draw different data (seed + rank) yet hold the same generator, critic and EMA, bit
    for bit, after 3 steps of DDP-reduced updates (grad_accum 2: no_sync on the first micro-batch)."""
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path), free_port()), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}_3.pt") for r in range(2))
    start = load_file(config.Config.student_path)
    assert any(not torch.equal(r0["net"][k], start[k]) for k in start), "the generator did not train"
    for name in ("net", "critic", "ema"):
        differ = differing(r0[name], r1[name])
        assert not differ, f"{name}: {len(differ)} tensors differ between the ranks, e.g. {differ[:3]}"


def _teacher_stage_worker(rank: int, out: str, port: int):
    """One rank of a 2-process teacher stage; records what each rank trains from at its first loss."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    loss = toy.teacher_loss

    def recorded(net, parts, prompts, videos, cfg_dropout):
        path = Path(out) / f"start_rank{rank}.pt"
        if not path.exists():
            torch.save({"net": net.state_dict(), "text": parts.text.model.state_dict(), "videos": videos}, path)
        return loss(net, parts, prompts, videos, cfg_dropout)

    toy.teacher_loss = recorded
    train.main([f"--out_dir={out}", "--stage=teacher", "--max_steps=1", "--batch_size=2", "--text_path=",
                "--evaluate=false"])


def test_teacher_stage_ranks_start_from_the_same_random_init(tmp_path):
    """Replicated training of a randomly initialised network (the toy teacher and its text encoder): every rank must
    start from rank 0's weights, and draw its own data."""
    torch.multiprocessing.spawn(_teacher_stage_worker, args=(str(tmp_path), free_port()), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"start_rank{r}.pt") for r in range(2))
    for part in ("net", "text"):
        differ = differing(r0[part], r1[part])
        assert not differ, f"{part}: {len(differ)} tensors differ between the ranks' starting weights, e.g. {differ[:3]}"
    assert not torch.equal(r0["videos"], r1["videos"]), "each rank must draw its own batch"


# --------------------------------------------------------------------------------------------- sample.py
def test_sample_writes_a_playable_ten_second_mp4(tmp_path):
    import imageio.v3 as iio
    import sample
    out = tmp_path / "s.mp4"
    sample.main([f"--out={out}", "--seconds=10", "--upscale=2", f"--out_dir={tmp_path}"])
    frames = iio.imread(out)
    assert frames.shape[0] >= 160 and frames.shape[-1] == 3, f"mp4 has shape {frames.shape}"


def test_sample_reads_a_step_checkpoint_as_ckpt_without_a_student_init(tmp_path, capsys, four_steps):
    """--ckpt step_N.safetensors (train.py's own format) == sampling that run's out_dir: the same EMA, the same video;
    and --ckpt needs no student_path on disk."""
    import imageio.v3 as iio
    import sample
    step = four_steps / "step_000004.safetensors"
    videos = {}
    for name, args in {"auto": [f"--out_dir={four_steps}"],
                       "ckpt": ["--ckpt", str(step), f"--out_dir={tmp_path}/none", "--student_path=missing.pt"]}.items():
        sample.main(args + [f"--out={tmp_path / name}.mp4", "--frames=12", "--upscale=1"])
        videos[name] = iio.imread(tmp_path / f"{name}.mp4")
    printed = capsys.readouterr().out
    assert f"student: {step} (ema)" in printed, printed
    assert videos["auto"].shape[0] >= 12 and (videos["auto"] == videos["ckpt"]).all(), "--ckpt sampled another model"


def test_sample_parses_the_readme_command_and_refuses_bad_flags(tmp_path, monkeypatch):
    """The README's Wan sample command, as written (space-separated flags), against stand-in files; then each bad
    flag a clear error before any work."""
    import sample
    monkeypatch.chdir(tmp_path)
    preset = yaml.safe_load((ROOT / "configs" / "wan1.3b_stream_r1.yaml").read_text())
    for key in ("text_path", "vae_path", "prompt_file"):
        Path(preset[key]).parent.mkdir(parents=True, exist_ok=True)
        Path(preset[key]).write_text("a cat\n")
    Path(preset["tokenizer_dir"]).mkdir(parents=True)
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("python sample.py --config configs/wan1.3b_stream_r1.yaml"))
    argv = shlex.split(line)[2:]
    argv[argv.index("--config") + 1] = str(ROOT / argv[argv.index("--config") + 1])
    cfg, own = sample.parse(argv)
    assert (cfg.world, cfg.model_size, own["ckpt"], own["prompt"], own["seconds"]) == (
        "wan", "1.3b", "checkpoints/rewardforcing.pt", ["..."], 60.0)
    for bad, message in [(["--prompt="], "--prompt is empty"),
                         (["--seconds=0"], "--seconds=0.0: expected a number > 0"),
                         (["--seconds", "-5"], "--seconds=-5.0: expected a number > 0"),
                         (["--seconds=abc"], "seconds='abc': expected a number"),
                         (["--frames=0"], "--frames=0: expected a number > 0"),
                         (["--frame=5"], "unknown flag --frame; sample.py takes --ckpt, --prompt, --seconds")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            sample.parse(bad)
