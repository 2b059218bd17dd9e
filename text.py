"""umT5-XXL text encoder through transformers: Wan's prompt cleaning, padding and negative prompt (REFERENCE.md §4).

Layout: context [B, text_len, d_model] float32; rows from each prompt's token count (EOS included) on are exactly zero.
"""
import html
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from checkpoint import LazyTensor, load_shards, open_weights

try:  # Wan and diffusers fix mojibake with ftfy when it is installed, and skip it otherwise (§4.3)
    import ftfy
except ImportError:
    ftfy = None

# Wan shared_config.sample_neg_prompt; the teacher's unconditional branch in SF / RF / SR1 (§4.4).
NEGATIVE_PROMPT = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"

# transformers config of Wan's umT5-XXL encoder (Wan2.1-*-Diffusers/text_encoder/config.json, §4.1, §4.2).
UMT5_XXL_CONFIG = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", layer_norm_epsilon=1e-6,
                       pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)

# Wan T5Encoder key -> transformers UMT5EncoderModel key (§4.2); gate.0 is the activated branch (wi_0), fc1 the linear.
_WAN_T5_TO_HF = [
    (r"^token_embedding\.", "shared."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
    (r"^norm\.", "encoder.final_layer_norm."),
]
_TIED = {"encoder.embed_tokens.weight": "shared.weight"}  # one tensor under two names in UMT5EncoderModel


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (§4.3): ftfy.fix_text (if installed), html.unescape twice, strip, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Frozen umT5 encoder producing Wan's padded context (§4.3).

    encode(prompts) -> [B, text_len, d_model] float32 on the model's device: ids = tokenizer(clean(p), padded to
    text_len with EOS, truncated), h = model(ids, mask); row i keeps h[i, :n_i], n_i = mask_i.sum() (EOS included),
    and is exactly zero after. Each cleaned prompt is encoded once: its n_i rows are kept (on the CPU, in the model's
    dtype) in an LRU cache of cache_size prompts (0: none, for an FSDP2-sharded encoder, whose forward every rank must
    run at once: a prompt cached on one rank only would hang the others). Runs under no_grad (not inference_mode:
    the context feeds differentiable cross-attention).
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int = 512, cache_size: int = 1024):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer needs pad and eos tokens (umT5: <pad> = 0, </s> = 1), got pad "
                             f"{tokenizer.pad_token_id}, eos {tokenizer.eos_token_id}")
        if tokenizer("a", add_special_tokens=True).input_ids[-1] != tokenizer.eos_token_id:
            raise ValueError("the tokenizer does not append EOS with add_special_tokens=True (Wan's context length "
                             "counts it, §4.3)")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the encoder's vocabulary only "
                             f"{model.config.vocab_size}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.text_len, self.cache_size = tokenizer, text_len, cache_size
        self.dim = model.config.d_model
        self.cache: OrderedDict[str, Tensor] = OrderedDict()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        """[B] prompts -> context [B, text_len, d_model] float32, zero after each prompt's tokens (EOS included)."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise TypeError(f"encode takes a non-empty list of prompts, got {prompts!r}")
        cleaned = [clean_prompt(p) for p in prompts]
        empty = [i for i, p in enumerate(cleaned) if not p]
        if empty:
            raise ValueError(f"prompts {empty} are empty after cleaning; an empty prompt has no text to condition on")
        device = self.model.device
        new = list(dict.fromkeys(p for p in cleaned if p not in self.cache))
        if new:
            tokens = self.tokenizer(new, padding="max_length", max_length=self.text_len, truncation=True,
                                    add_special_tokens=True, return_tensors="pt")
            mask = tokens.attention_mask.to(device)
            hidden = self.model(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
            for p, h, n in zip(new, hidden, mask.sum(dim=1).tolist()):
                self.cache[p] = h[:n].to("cpu", copy=True)
        context = torch.zeros(len(cleaned), self.text_len, self.dim, device=device)
        for i, p in enumerate(cleaned):
            rows = self.cache[p]
            context[i, :len(rows)] = rows.to(device)
            self.cache.move_to_end(p)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return context


def _wan_t5_key_to_hf(key: str) -> str | None:
    for pattern, repl in _WAN_T5_TO_HF:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def load_text_encoder(path: str | Path, tokenizer_dir: str | Path, text_len: int = 512,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      config: dict | None = None, cache_size: int = 1024, shard=None) -> TextEncoder:
    """TextEncoder from local files only (nothing is downloaded).

    path: a transformers folder (config.json + safetensors: google/umt5-xxl, whose decoder is not read, or
    Wan2.1-*-Diffusers/text_encoder), or Wan's models_t5_umt5-xxl-enc-bf16.pth, mapped per §4.2 into
    UMT5EncoderModel(config or UMT5_XXL_CONFIG). tokenizer_dir: the tokenizer folder (google/umt5-xxl or
    Wan2.1-*-Diffusers/tokenizer). dtype: torch.bfloat16 as Wan runs it (§4.3). The encoder is built on the meta
    device, `shard(model)` (FSDP2) applied, then stored in dtype on device: keys and shapes are checked from the
    file headers, then each rank reads only the rows it holds (checkpoint.load_shards), so the 5.7 B parameters are
    never held twice, nor whole on a sharding rank. cache_size: see TextEncoder (0 when sharded: config.Components).
    """
    path, tokenizer_dir = Path(path), Path(tokenizer_dir)
    if not path.exists():
        raise FileNotFoundError(f"text encoder weights not found: {path}")
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {tokenizer_dir}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is a folder without config.json (expected a transformers umT5 folder)")
    weights = open_weights(path)[0]
    if not isinstance(weights, dict) or not all(isinstance(v, (Tensor, LazyTensor)) for v in weights.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors (got {type(weights).__name__})")
    if path.is_dir():
        config, described = UMT5Config.from_pretrained(path, local_files_only=True), "in its config.json"
        names = {k: k for k in weights if not k.startswith(("decoder.", "lm_head."))}
    else:
        config, described = UMT5Config(**(config or UMT5_XXL_CONFIG)), f"{config or UMT5_XXL_CONFIG}"
        names = {k: _wan_t5_key_to_hf(k) for k in weights}  # Wan's name -> transformers' (§4.2)
    with torch.device("meta"):
        model = UMT5EncoderModel(config).eval()
    expected = model.state_dict()
    unexpected = [k for k, name in names.items() if name not in expected]
    sd = {name: weights[k] for k, name in names.items() if name in expected}
    for a, b in [*_TIED.items(), *((b, a) for a, b in _TIED.items())]:  # one tensor under two names: either is saved
        if a not in sd and b in sd:
            sd[a] = sd[b]
    missing = [k for k in expected if k not in sd]
    if missing or unexpected:
        raise ValueError(f"{path} does not match UMT5EncoderModel with the config {described} (REFERENCE.md §4.2): "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(missing)} missing transformers "
                         f"keys {missing[:5]}")
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(sd[k].shape)}, the config {described} gives "
                             f"{tuple(v.shape)}")
    model.to(dtype)
    if shard is not None:
        shard(model)
    model.to_empty(device=device)
    load_shards(model, sd)
    return TextEncoder(model, tokenizer, text_len, cache_size)
