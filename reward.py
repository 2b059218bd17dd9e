"""VideoReward (VideoAlign: Qwen2-VL-2B + reward head) through plain transformers, with one-forward gradient saliency.

Paper objects: the reward model rho(video, prompt) -> raw (VQ, MQ, TA) logits and their z-scores (REFERENCE §7.1,
§7.5), and the per-axis input-gradient saliency S_m = ||d z_m / d patch||_2 on the latent grid (REFERENCE §8.3).

Layouts: pixels [B, T, 3, H, W] in [-1, 1]; reward-model frames [T', 3, H', W'] in [0, 1]; Qwen2-VL patches
[t*gh*gw, 3*tp*p*p] in merge-window row order (REFERENCE §7.4); saliency [B, A, F, h, w] on the latent grid.
Fixes of the public code, each pinned by a test: 2-fps frame selection (§10.6), pixels mapped to [0, 1] (§10.5),
saliency unpatchified in merge-window order (§10.7), one reward forward for scores and saliency, each sample scored
and weighted separately (§10.10), saliency in z units (§10.8). transformers 5.x; no peft, trl or torchvision (§7.7).
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

AXES = ("VQ", "MQ", "TA")  # order of the reward tokens in the template and of the logits (REFERENCE §7.1)
REWARD_TOKENS = {"VQ": "<|VQ_reward|>", "MQ": "<|MQ_reward|>", "TA": "<|TA_reward|>"}
NORM_DEFAULTS = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}  # (mean, std), REFERENCE §7.5
RM_FPS = 2.0  # data_config.fps: VideoReward was trained on 2-fps frames (REFERENCE §7.4)
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils VIDEO_MIN_PIXELS (REFERENCE §7.4)
VIDEO_MAX_PIXELS = 256 * 28 * 28  # data_config.max_frame_pixels = 200704 (REFERENCE §7.4)
FPS_MIN_FRAMES, FPS_MAX_FRAMES = 4, 768  # qwen-vl-utils smart_nframes bounds (REFERENCE §7.4)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL processor normalisation (REFERENCE §7.4)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LORA_R, LORA_ALPHA = 64, 128  # VideoAlign train.sh (REFERENCE §7.1); model_config.json wins when present

# VideoAlign prompt_template.py DETAILED_PROMPT_WITH_SPECIAL_TOKEN, copied exactly (REFERENCE §7.3). Five lines end in
# spaces (after "Quality:**", "Alignment:**", "possible.", "acceptable."): keep them.
DETAILED_PROMPT_WITH_SPECIAL_TOKEN = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**  
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**  
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**  
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""


def build_prompt(prompt: str) -> str:
    """VideoAlign build_prompt(prompt, ["VQ", "MQ", "TA"], "detailed_special") (REFERENCE §7.3).

    The prompt text comes after the VQ and MQ tokens, so under causal attention only TA sees it.
    """
    return DETAILED_PROMPT_WITH_SPECIAL_TOKEN.format(text_prompt=prompt)


@dataclass
class RewardResult:
    """Scores of one reward call. raw, z: [B, A] (A = len(axes)); saliency: [B, A, F, h, w] or None."""
    raw: Tensor
    z: Tensor
    saliency: Tensor | None
    axes: tuple[str, ...]


def saliency_to_latent_grid(sal: Tensor, latent_shape: tuple[int, int, int]) -> Tensor:
    """Per-patch saliency [B, A, t, h', w'] -> latent grid [B, A, F, h, w] (trilinear, align_corners=False, §8.3)."""
    b, a = sal.shape[:2]
    out = F.interpolate(sal.flatten(0, 1)[:, None].float(), size=tuple(latent_shape), mode="trilinear",
                        align_corners=False)
    return out.view(b, a, *latent_shape)


# -------------------------------------------------------------------------------- preprocessing (§7.4, §7.8)

def smart_nframes(total: int, src_fps: float, fps: float = RM_FPS, factor: int = 2) -> int:
    """qwen-vl-utils smart_nframes: n = round_f(clamp(total / src_fps * fps, ceil_f(4), floor_f(min(768, total))))."""
    min_frames = math.ceil(FPS_MIN_FRAMES / factor) * factor
    max_frames = math.floor(min(FPS_MAX_FRAMES, total) / factor) * factor
    n = round(min(max(total / src_fps * fps, min_frames), max_frames) / factor) * factor
    if not factor <= n <= total:
        raise ValueError(f"cannot sample frames at {fps} fps from {total} frames at {src_fps} fps "
                         f"(got n={n}, need >= {factor})")
    return n


def frame_indices(total: int, src_fps: float, fps: float = RM_FPS, all_frames: bool = False,
                  factor: int = 2) -> Tensor:
    """Frames fed to the reward model: round(linspace(0, total-1, smart_nframes)); 81 @ 16 fps -> [0, 9, ..., 71, 80].

    all_frames=True reproduces the published input (SR1, REFERENCE §8.3): every frame, trimmed to a multiple of factor.
    """
    if all_frames:
        if total < factor:
            raise ValueError(f"need at least {factor} frames, got {total}")
        return torch.arange(total - total % factor)
    return torch.linspace(0, total - 1, smart_nframes(total, src_fps, fps, factor)).round().long()


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = VIDEO_MIN_PIXELS,
                 max_pixels: int = VIDEO_MAX_PIXELS) -> tuple[int, int]:
    """Qwen2-VL smart_resize: multiples of factor, area in [min_pixels, max_pixels], aspect kept; 480x832 -> 336x588."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen_patchify(frames01: Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
                  merge_size: int = 2) -> tuple[Tensor, Tensor]:
    """Qwen2-VL processor patches, differentiable (REFERENCE §7.4).

    frames01: [T, 3, H, W] in [0, 1]; T a multiple of temporal_patch_size, H and W of patch_size * merge_size.
    Returns pixel_values [t*gh*gw, 3*tp*p*p], CLIP mean/std applied, rows in merge-window order (t, gh/m, gw/m, m, m),
    each row laid out (C, tp, p, p) as the ViT's Conv3d reads it; grid_thw [1, 3] long = (t, gh, gw) in patches.
    """
    if frames01.dim() != 4 or frames01.shape[1] != 3:
        raise ValueError(f"frames must be [T, 3, H, W], got {tuple(frames01.shape)}")
    T, _, H, W = frames01.shape
    cell = patch_size * merge_size
    if T % temporal_patch_size or H % cell or W % cell:
        raise ValueError(f"frames [T={T}, H={H}, W={W}]: T must divide by {temporal_patch_size}, H and W by {cell}")
    mean = frames01.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = frames01.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    pixel_values = rearrange((frames01 - mean) / std,
                             "(t tp) c (bh mh ph) (bw mw pw) -> (t bh bw mh mw) (c tp ph pw)",
                             tp=temporal_patch_size, mh=merge_size, mw=merge_size, ph=patch_size, pw=patch_size)
    grid_thw = torch.tensor([[T // temporal_patch_size, H // patch_size, W // patch_size]], device=frames01.device)
    return pixel_values, grid_thw


def qwen_unpatchify(values: Tensor, grid_thw: Tensor, merge_size: int = 2) -> Tensor:
    """Exact inverse of qwen_patchify's row order for per-patch values: [t*gh*gw, ...] -> [t, gh, gw, ...].

    The published values.view(t, gh, gw) is wrong: it interleaves the halves of the merge windows (REFERENCE §10.7).
    """
    t, gh, gw = (int(v) for v in grid_thw.reshape(-1)[:3])
    if values.shape[0] != t * gh * gw or gh % merge_size or gw % merge_size:
        raise ValueError(f"{values.shape[0]} rows do not match grid (t={t}, gh={gh}, gw={gw}) with merge {merge_size}")
    return rearrange(values, "(t bh bw mh mw) ... -> t (bh mh) (bw mw) ...", t=t, bh=gh // merge_size,
                     bw=gw // merge_size, mh=merge_size, mw=merge_size)


def preprocess_video(frames: Tensor, src_fps: float, fps: float = RM_FPS, all_frames: bool = False,
                     min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS, patch_size: int = 14,
                     temporal_patch_size: int = 2, merge_size: int = 2) -> tuple[Tensor, Tensor]:
    """One video [T, 3, H, W] in [-1, 1] -> (pixel_values, grid_thw), differentiable (REFERENCE §7.8).

    (x + 1) / 2 clamped to [0, 1] (not the published 255 x, §10.5) -> 2-fps frame selection (§10.6) -> smart_resize by
    bicubic antialiased F.interpolate, clamped to [0, 1] -> qwen_patchify. No uint8 rounding, so gradients flow.
    """
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"video must be [T, 3, H, W], got {tuple(frames.shape)}")
    x = ((frames.float() + 1) / 2).clamp(0, 1)
    x = x[frame_indices(x.shape[0], src_fps, fps, all_frames, temporal_patch_size).to(x.device)]
    size = smart_resize(x.shape[2], x.shape[3], patch_size * merge_size, min_pixels, max_pixels)
    if size != tuple(x.shape[2:]):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return qwen_patchify(x, patch_size, temporal_patch_size, merge_size)


# -------------------------------------------------------------------------------- reward model (§7.1, §7.6-7.7)

class VideoReward(nn.Module):
    """VideoAlign's Qwen2VLRewardModelBT on transformers 5.x (REFERENCE §7.6-7.7): Qwen2-VL plus
    rm_head = Linear(hidden, 1, bias=False) read at the three reward tokens. Inputs are embedded by hand, the video
    embeddings scattered at <|video_pad|>, and the language model runs with position_ids=None, i.e. 1-D positions.

    qwen: transformers Qwen2VLForConditionalGeneration; tokenizer: holds the reward tokens and a chat template;
    norm: axis -> (mean, std) of the z-scores (§7.5); fps, min_pixels, max_pixels, all_frames: model input (§7.4).
    """

    def __init__(self, qwen: nn.Module, tokenizer, norm: dict[str, tuple[float, float]] | None = None,
                 fps: float = RM_FPS, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                 all_frames: bool = False, gradient_checkpointing: bool = False):
        super().__init__()
        self.qwen, self.tokenizer = qwen, tokenizer
        self.rm_head = nn.Linear(qwen.config.text_config.hidden_size, 1, bias=False)
        self.fps, self.min_pixels, self.max_pixels, self.all_frames = fps, min_pixels, max_pixels, all_frames
        self.norm = dict(norm or NORM_DEFAULTS)  # python floats: casting the module to bf16 must not round them
        ids = tokenizer.convert_tokens_to_ids([REWARD_TOKENS[a] for a in AXES])
        if any(i is None or i == tokenizer.unk_token_id for i in ids) or len(set(ids)) != len(AXES):
            raise ValueError(f"tokenizer must hold the reward tokens {list(REWARD_TOKENS.values())}, got ids {ids}")
        self.reward_token_ids = ids
        if tokenizer.chat_template is None:
            raise ValueError("tokenizer has no chat template: VideoReward renders its prompt with it (REFERENCE §7.3)")
        tokenizer.padding_side = "right"  # as VideoAlign (§7.3); with 1-D positions the real tokens keep 0..L-1
        vc = qwen.config.vision_config
        self.patch_size, self.temporal_patch_size, self.merge_size = (vc.patch_size, vc.temporal_patch_size,
                                                                      vc.spatial_merge_size)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            # transformers 5.x checkpoints the ViT blocks and the decoder layers alike (GradientCheckpointingLayer), but
            # only in training mode, which score_and_saliency switches on for the saliency pass: safe without dropout.
            if qwen.config.text_config.attention_dropout:
                raise ValueError("gradient checkpointing runs the reward model in training mode: "
                                 "attention_dropout must be 0")
            qwen.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.requires_grad_(False)
        self.eval()

    def prompt_ids(self, prompts: list[str], n_video_tokens: int) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask [B, L] (right padded) of the chat-rendered detailed_special prompts, the single
        <|video_pad|> expanded to n_video_tokens = t*gh*gw / merge^2 copies as Qwen2-VL's processor does (§7.3)."""
        pad = "<|video_pad|>"
        texts = []
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompts must be non-empty strings, got {p!r}")
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_prompt(p)}]}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if text.count(pad) != 1:
                raise ValueError(f"the rendered prompt must hold one {pad}, found {text.count(pad)} (chat template?)")
            texts.append(text.replace(pad, pad * n_video_tokens))
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, pixel_values: Tensor, grid_thw: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Raw reward logits [B, 3] in order (VQ, MQ, TA) (REFERENCE §7.7).

        pixel_values [B*N, 3*tp*p*p]: B videos of N patches each, concatenated; grid_thw [B, 3]; input_ids [B, L].
        """
        model = self.qwen.model
        embeds = model.language_model.embed_tokens(input_ids)
        video = model.visual(pixel_values, grid_thw=grid_thw).pooler_output
        video_mask = input_ids == self.qwen.config.video_token_id
        if video_mask.sum() != video.shape[0]:
            raise ValueError(f"{int(video_mask.sum())} <|video_pad|> tokens for {video.shape[0]} video embeddings")
        embeds = embeds.masked_scatter(video_mask[..., None], video.to(embeds.dtype))
        hidden = model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=None,
                                      use_cache=False).last_hidden_state
        hits = torch.stack([input_ids == i for i in self.reward_token_ids], dim=1)  # [B, 3, L]
        if not (hits.sum(-1) == 1).all():
            raise ValueError(f"each prompt must hold each reward token once, counts {hits.sum(-1).tolist()}")
        pos = hits.float().argmax(-1)  # [B, 3]
        picked = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, 3, D]
        return self.rm_head(picked)[..., 0]

    def score_and_saliency(self, frames: Tensor, prompts: list[str], latent_shape: tuple[int, int, int] | None = None,
                           axes: tuple[str, ...] = AXES, fps: float = 16.0) -> RewardResult:
        """Scores and, given latent_shape, per-axis saliency from ONE reward forward (REFERENCE §8.3, §10.7-10.10).

        frames [B, T, 3, H, W] in [-1, 1] at `fps` (the decoded rollout, used as data: no gradient reaches it);
        prompts: B strings. raw, z [B, A]: z_a = (raw_a - mean_a) / std_a. saliency [B, A, F, h, w] with
        latent_shape = (F, h, w): S_a = ||d z_a / d patch||_2 per Qwen2-VL patch (3*tp*p*p values), unpatchified in
        merge-window order, resized trilinearly. Convention (§10.8): z-logit gradients (raw-logit gradients / std_a),
        so every axis' map is in the z units that the fusion softmax compares. One backward per axis of the batch sum:
        each sample's logit depends on its own patches only, so each sample gets its own map (§10.10). With gradient
        checkpointing each backward recomputes the checkpointed layers.
        """
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
        if len(prompts) != frames.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for a batch of {frames.shape[0]} videos")
        if not axes or len(set(axes)) != len(axes) or not set(axes) <= set(AXES):
            raise ValueError(f"axes must be distinct names from {AXES}, got {axes}")
        if latent_shape is not None and (len(latent_shape) != 3 or min(latent_shape) < 1):
            raise ValueError(f"latent_shape must be (F, h, w) of positive sizes, got {latent_shape}")
        device = self.rm_head.weight.device
        frames = frames.detach().to(device)
        patches = [preprocess_video(v, fps, self.fps, self.all_frames, self.min_pixels, self.max_pixels,
                                    self.patch_size, self.temporal_patch_size, self.merge_size) for v in frames]
        pixel_values = torch.cat([p for p, _ in patches])
        grid_thw = torch.cat([g for _, g in patches])
        n_tokens = int(grid_thw[0].prod()) // self.merge_size ** 2
        input_ids, attention_mask = (t.to(device) for t in self.prompt_ids(prompts, n_tokens))
        cols = [AXES.index(a) for a in axes]
        mean, std = (torch.tensor([self.norm[a][i] for a in axes], device=device) for i in (0, 1))

        need_grad = latent_shape is not None
        pixel_values = pixel_values.detach().requires_grad_(need_grad)
        self.qwen.train(need_grad and self.gradient_checkpointing)  # HF checkpoints layers in training mode only
        try:
            with torch.set_grad_enabled(need_grad):  # in the model's dtype, under the caller's autocast if any
                raw = self(pixel_values, grid_thw, input_ids, attention_mask)[:, cols].float()
        finally:
            self.qwen.eval()

        saliency = None
        if need_grad:
            maps = []
            for k in range(len(axes)):
                (g,) = torch.autograd.grad(raw[:, k].sum(), pixel_values, retain_graph=k < len(axes) - 1)
                s = g.float().norm(dim=-1) / std[k]  # [B*N], z units
                s = qwen_unpatchify(rearrange(s, "(b n) -> n b", b=len(prompts)), grid_thw[0], self.merge_size)
                maps.append(rearrange(s, "t h w b -> b t h w"))
            saliency = saliency_to_latent_grid(torch.stack(maps, 1), latent_shape)
        raw = raw.detach()
        return RewardResult(raw=raw, z=(raw - mean) / std, saliency=saliency, axes=tuple(axes))

    @classmethod
    def from_pretrained(cls, base_dir: str | Path, release_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device | None = None,
                        gradient_checkpointing: bool = False) -> "VideoReward":
        """Qwen2-VL-2B base config + tokenizer from base_dir (local files only) and the VideoAlign release from
        release_dir: model_config.json and checkpoint-*/model.pth (the latest step) in the transformers 4.45 PEFT layout
        (REFERENCE §7.2). LoRA merged by hand, keys renamed to 5.x, loaded strictly. dtype: bf16 as VideoAlign runs it
        (§7.1; a run's bf16 setting picks it)."""
        from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

        base_dir, release_dir = Path(base_dir), Path(release_dir)
        for need in (base_dir / "config.json", release_dir / "model_config.json"):
            if not need.is_file():
                raise FileNotFoundError(f"missing {need}")
        ckpts = sorted(release_dir.glob("checkpoint-*/model.pth"), key=lambda p: int(p.parent.name.split("-")[-1]))
        if not ckpts:
            raise FileNotFoundError(f"no checkpoint-*/model.pth under {release_dir}")
        mc = json.loads((release_dir / "model_config.json").read_text())
        data, model_cfg, lora = (mc.get(k, {}) for k in ("data_config", "model_config", "peft_lora_config"))
        if model_cfg.get("output_dim", 1) != 1 or model_cfg.get("reward_token", "special") != "special":
            raise ValueError(f"{release_dir}/model_config.json: expected output_dim 1 and reward_token 'special', "
                             f"got {model_cfg}")
        if data.get("prompt_template_type", "detailed_special") != "detailed_special" or \
                list(data.get("eval_dim", AXES)) != list(AXES):
            raise ValueError(f"{release_dir}/model_config.json: expected the detailed_special template over {AXES}, "
                             f"got {data}")
        r = lora.get("lora_r", LORA_R)
        alpha = lora.get("lora_alpha", LORA_ALPHA)
        scale = alpha / math.sqrt(r) if lora.get("use_rslora", False) else alpha / r
        inf = mc.get("inference_config") or {}
        norm = {a: (inf.get(f"{a}_mean", NORM_DEFAULTS[a][0]), inf.get(f"{a}_std", NORM_DEFAULTS[a][1])) for a in AXES}

        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
        tokenizer.add_tokens([REWARD_TOKENS[a] for a in AXES], special_tokens=True)  # as VideoAlign's trainer (§7.1)
        config = Qwen2VLConfig.from_pretrained(base_dir, local_files_only=True)
        config.text_config.vocab_size = len(tokenizer)  # = VideoAlign's resize_token_embeddings(len(tokenizer)) (§7.1)
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=True, mmap=True)
        state = convert_videoalign_state_dict(state, scale)
        rm_head = state.pop("rm_head.weight", None)
        if rm_head is None:
            raise KeyError(f"{ckpts[-1]}: no base_model.model.rm_head.weight")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # built on the device in dtype (no fp32 copy first), with its RoPE frequency buffers in fp32 as transformers
        # makes them (a cast module would round them: angles off by radians at position 1000)
        with torch.device(device):
            qwen = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
            reward = cls(qwen, tokenizer, norm, fps=data.get("fps", RM_FPS),
                         max_pixels=data.get("max_frame_pixels", VIDEO_MAX_PIXELS),
                         gradient_checkpointing=gradient_checkpointing)
        missing, unexpected = reward.qwen.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KeyError(f"{ckpts[-1]} does not fit Qwen2-VL from {base_dir}: {len(missing)} missing {missing[:10]}, "
                           f"{len(unexpected)} unexpected {unexpected[:10]}")
        reward.rm_head.to(dtype).weight.data.copy_(rm_head)
        return reward


def convert_videoalign_state_dict(state: dict[str, Tensor], lora_scale: float) -> dict[str, Tensor]:
    """VideoAlign model.pth (PEFT-wrapped transformers 4.45 tree) -> transformers 5.x Qwen2VLForConditionalGeneration
    keys plus rm_head.weight (REFERENCE §7.2).

    Strip "base_model.model."; merge W = W_base + lora_scale * B @ A in fp32 (lora_scale = alpha / r); drop the lora_*
    keys and the ".base_layer" infix; rename ^visual -> model.visual, ^model(?!.(language_model|visual)) ->
    model.language_model.
    """
    prefix = "base_model.model."
    foreign = [k for k in state if not k.startswith(prefix)]
    if foreign:
        raise KeyError(f"expected the PEFT layout (keys under '{prefix}'), {len(foreign)} keys are not: {foreign[:10]}")
    state = {k[len(prefix):]: v for k, v in state.items()}
    lora_key = re.compile(r"^(.*)\.lora_([AB])\.default\.weight$")
    lora = {m.group(1, 2): v for k, v in state.items() if (m := lora_key.match(k))}
    odd = [k for k in state if "lora_" in k and not lora_key.match(k)]
    if odd:
        raise KeyError(f"unsupported LoRA keys (only lora_A / lora_B of adapter 'default'): {odd[:10]}")
    out, merged = {}, set()
    for k, v in state.items():
        if lora_key.match(k):
            continue
        if k.endswith(".base_layer.weight"):
            module = k[:-len(".base_layer.weight")]
            if (module, "A") not in lora or (module, "B") not in lora:
                raise KeyError(f"{prefix}{k} has no lora_A / lora_B pair")
            v = (v.float() + lora_scale * (lora[(module, "B")].float() @ lora[(module, "A")].float())).to(v.dtype)
            merged.add(module)
        name = re.sub(r"^visual", "model.visual", k.replace(".base_layer.", "."))
        out[re.sub(r"^model(?!\.(language_model|visual))", "model.language_model", name)] = v
    orphans = sorted({m for m, _ in lora} - merged)
    if orphans:
        raise KeyError(f"LoRA weights without a base layer: {orphans[:10]}")
    return out
