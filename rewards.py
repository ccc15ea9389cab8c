"""
rewards.py -- r(samples, prompts): what stage 2 maximises.

Every reward is a callable  reward(samples, prompts) -> {name: Tensor[B]}  and is differentiable
in `samples` where the method back-propagates through it (ALGORITHM.md 5.7, 6).

    1. toy rewards of a 2-D point, each with its exact reward-tilted mixture (ALGORITHM.md 9.5)
    2. image rewards: CLIPScore, PickScore, Aesthetic, HPSv2.1, ImageReward (REWARDS.md)
    3. the weighted multi-reward
"""
import torch

import models

# ---------------------------------------------------------------------------------------------
# 1. Toy rewards and their exact tilts
# ---------------------------------------------------------------------------------------------

# The toy world's "images" are 2-D points x [B, 2] (ToyBackbone.decode is the identity). Both
# rewards ignore the prompt, are differentiable in x, and tilt an isotropic mixture
#     p(x|c) = sum_j pi_cj N(x; mu_j, s_j^2 I)
# into another isotropic mixture, in closed form (ALGORITHM.md 9.5), because a Gaussian times
# exp(linear or quadratic) is again a Gaussian times a constant:
#     N(x; mu_j, s_j^2 I) exp(beta r(x)) = f_j  N(x; mu~_j, s~_j^2 I),
# so  p~(x|c) = p(x|c) exp(beta r(x)) / Z_beta(c)  has weights  pi~_cj = pi_cj f_j / Z_beta(c),
# with  Z_beta(c) = sum_j pi_cj f_j.  Every row of the weight table is tilted this way, the null
# row "" included: its tilt is the tilt of p(x|null), which in general is *not* the mean of the
# tilted conditional rows (irrelevant for the exactness checks, which use g = 1).


def tilted_weights(weights, log_f):
    """pi~_cj = pi_cj f_j / sum_j' pi_cj' f_j'  for every row c. weights [C, J], log_f [J]."""
    return torch.softmax(torch.log(weights) + log_f[None], dim=1)


def tilt_linear(mixture, a, beta):
    """Exact tilt of an isotropic mixture by exp(beta a^T x) (ALGORITHM.md 9.5):
        mu~_j = mu_j + beta s_j^2 a,   s~_j = s_j,
        log f_j = beta a^T mu_j + 1/2 beta^2 s_j^2 |a|^2.
    Returns a new models.Mixture (weights [C, J], one row per condition, null row included)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    s2 = mixture.stds ** 2
    log_f = beta * mixture.means @ a + 0.5 * beta ** 2 * s2 * (a @ a)
    means = mixture.means + beta * s2[:, None] * a[None]
    return models.Mixture(means, mixture.stds.clone(), tilted_weights(mixture.weights, log_f))


def quadratic_log_f(mixture, gamma, m, beta):
    """log f_j for r = -(gamma/2)|x - m|^2, up to a j-independent constant:
        f_j  prop. to  N(mu_j; m, (s_j^2 + 1/(beta gamma)) I)
             = (1 + bg s_j^2)^(-d/2) exp(-bg |mu_j - m|^2 / (2 (1 + bg s_j^2))) * const,
    with bg = beta gamma.
    The second form is exactly E_{N(mu_j, s_j^2)}[exp(beta r)] (so sum_j pi_cj f_j = Z_beta(c))
    and stays finite at beta = 0."""
    m = torch.as_tensor(m, dtype=torch.float64)
    bg = beta * gamma
    s2 = mixture.stds ** 2
    assert bool((1 + bg * s2 > 0).all()), "beta * gamma too negative: the tilt is not normalisable"
    d = mixture.means.shape[1]
    dist2 = ((mixture.means - m) ** 2).sum(1)
    return -0.5 * d * torch.log1p(bg * s2) - bg * dist2 / (2 * (1 + bg * s2))


def tilt_quadratic(mixture, gamma, m, beta):
    """Exact tilt of an isotropic mixture by exp(-beta gamma/2 |x - m|^2) (ALGORITHM.md 9.5):
        precision 1/s~_j^2 = 1/s_j^2 + beta gamma,   i.e. s~_j^2 = s_j^2 / (1 + beta gamma s_j^2),
        mu~_j = (mu_j / s_j^2 + beta gamma m) / (1/s_j^2 + beta gamma),
        pi~_cj prop. to pi_cj N(mu_j; m, (s_j^2 + 1/(beta gamma)) I)    (quadratic_log_f).
    Returns a new models.Mixture."""
    m = torch.as_tensor(m, dtype=torch.float64)
    bg = beta * gamma
    s2 = mixture.stds ** 2
    prec = 1 / s2 + bg
    means = (mixture.means / s2[:, None] + bg * m[None]) / prec[:, None]
    log_f = quadratic_log_f(mixture, gamma, m, beta)
    return models.Mixture(means, (1 / prec).sqrt(), tilted_weights(mixture.weights, log_f))


class LinearReward:
    """r(x) = a^T x. Callable (samples [B, d], prompts) -> {name: Tensor[B]}, differentiable."""

    def __init__(self, a=(1.0, 0.0), name="linear"):
        self.a = torch.as_tensor(a, dtype=torch.float64)
        self.name = name

    def __call__(self, samples, prompts=None):
        return {self.name: samples @ self.a.to(samples)}

    def tilt(self, mixture, beta):
        """The exact tilted mixture p(x|c) exp(beta r(x)) / Z_beta(c)."""
        return tilt_linear(mixture, self.a, beta)

    def exact_mean(self, mixture):
        """E_{p(x|c)}[r] = sum_j pi_cj a^T mu_j, Tensor[C] (float64)."""
        return mixture.weights @ (mixture.means @ self.a)

    def log_partition(self, mixture, beta):
        """log Z_beta(c) = log E_{p(x|c)}[exp(beta r)] = logsumexp_j(log pi_cj + log f_j), [C]."""
        a, s2 = self.a, mixture.stds ** 2
        log_f = beta * mixture.means @ a + 0.5 * beta ** 2 * s2 * (a @ a)
        return torch.logsumexp(torch.log(mixture.weights) + log_f[None], dim=1)


class QuadraticReward:
    """r(x) = -(gamma/2) |x - m|^2. Callable (samples [B, d], prompts) -> {name: Tensor[B]}."""

    def __init__(self, gamma=1.0, m=(2.0, 0.0), name="quadratic"):
        self.gamma = float(gamma)
        self.m = torch.as_tensor(m, dtype=torch.float64)
        self.name = name

    def __call__(self, samples, prompts=None):
        return {self.name: -0.5 * self.gamma * ((samples - self.m.to(samples)) ** 2).sum(1)}

    def tilt(self, mixture, beta):
        return tilt_quadratic(mixture, self.gamma, self.m, beta)

    def exact_mean(self, mixture):
        """E_{p(x|c)}[r] = -(gamma/2) sum_j pi_cj (|mu_j - m|^2 + d s_j^2), Tensor[C]."""
        d = mixture.means.shape[1]
        per_j = ((mixture.means - self.m) ** 2).sum(1) + d * mixture.stds ** 2
        return -0.5 * self.gamma * mixture.weights @ per_j

    def log_partition(self, mixture, beta):
        """log Z_beta(c) = logsumexp_j(log pi_cj + log f_j), f_j exact (quadratic_log_f)."""
        log_f = quadratic_log_f(mixture, self.gamma, self.m, beta)
        return torch.logsumexp(torch.log(mixture.weights) + log_f[None], dim=1)

# ---------------------------------------------------------------------------------------------
# 2. Image rewards
# ---------------------------------------------------------------------------------------------

# (image rewards go here)
#
# Every scorer is a callable   scorer(images, prompts) -> {scorer.name: Tensor[B]}
#   images   float [B, 3, H, W] in [0, 1]: the VAE decode (x/2 + 0.5).clamp(0, 1) (REWARDS.md 0)
#   prompts  list of B strings; image i is scored against prompts[i] only (pairs, never the
#            all-images-x-all-prompts matrix that ImageReward's `inference_rank` builds).
# Gradients flow from the scores back to `images`, because every preprocessing step is a torch
# op (REWARDS.md 2.3). No scorer parameter ever gets a gradient: each network is frozen and in
# eval mode (dropout off), so the generator is the only thing reward back-prop can move.
# Networks load lazily on the first call: building a reward set costs nothing, and a run that
# never asks for ImageReward never needs its 1.8 GB checkpoint.
#
# Where weights come from: `sources` maps a slot to a hub id or a local path (DEFAULT_SOURCES).
# Only transformers + torch are used (REWARDS.md 2). The two checkpoints that exist only in
# their original open_clip / BLIP layouts (HPSv2.1, ImageReward) are converted key by key, and
# a key the converter does not know is an error, never silently dropped.
#
# Image-reward imports live here, not at the top of the file, so that the toy section stays
# import-light; transformers itself is imported inside the loaders (it costs ~4-7 s).
import os
import re

import torch.nn as nn
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP normalisation, used by all 5 scorers
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PICKSCORE_TABLE_SCALE = 26.0  # RTDMD trains on PickScore/26; paper tables report PickScore raw
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.033339496605407  # REWARDS.md 1.5

# slot -> hub id or local path. A raw-file slot may also be a local file or a folder holding it.
# A "*_config" slot may be a transformers config object (tests use tiny ones); None = real size.
DEFAULT_SOURCES = {
    "clip_l": "openai/clip-vit-large-patch14",  # CLIPScore + Aesthetic backbone (shared)
    "pickscore": "yuvalkirstain/PickScore_v1",
    "pickscore_tokenizer": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",  # PickScore's processor
    "aesthetic_head": "trl-lib/ddpo-aesthetic-predictor",  # or the .pth file itself
    "hpsv2": "xswu/HPSv2",  # holds HPS_v2.1_compressed.pt
    "hpsv2_tokenizer": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",  # same BPE as open_clip
    "hpsv2_config": None,
    "imagereward": "THUDM/ImageReward",  # holds ImageReward.pt
    "imagereward_tokenizer": "google-bert/bert-base-uncased",
    "imagereward_config": None,
}


def quantize_uint8(images):
    """round(255 x) / 255: the 8-bit image that eval and GRPO score (ALGORITHM.md 6).
    Piecewise constant, so its gradient is zero: never use it on the back-prop path."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def crop_offset(margin, rounding):
    """Top (or left) offset of a centred crop that leaves `margin` pixels out.
    "round": torchvision's CenterCrop, int(round(margin / 2)) with Python's round-half-to-even
             (margin 75 -> 38, 3 -> 2, 1 -> 0); the original ImageReward, LAION aesthetic and
             CLIPScore pipelines crop this way.
    "floor": transformers' image processors, margin // 2 (75 -> 37): PickScore's CLIP processor."""
    return int(round(margin / 2.0)) if rounding == "round" else margin // 2


def preprocess(images, size=224, fit="crop", mode="bicubic", crop="floor"):
    """[B,3,H,W] in [0,1] -> normalised [B,3,size,size], differentiable (REWARDS.md 2.3).

    fit="crop": shortest side -> size, then centre crop (CLIP processor; torchvision
                Resize + CenterCrop in RTDMD's tensor path); `crop` is crop_offset's rounding
                of an odd margin, one pixel that moves a score by ~1e-2 on a 1000x749 image.
    fit="pad":  longest side -> size, then zero-pad to a centred square (HPSv2 "ResizeMaxSize").
    """
    h, w = images.shape[-2:]
    if fit == "crop":  # long side truncated with int(), as both the HF processor and torchvision do
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    else:
        nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    x = images
    if (nh, nw) != (h, w):
        # antialias=True: PIL always low-pass filters when it shrinks (512 -> 224); without it
        # the kernel aliases and scores drift. clamp: PIL's uint8 output cannot overshoot [0,1]
        # the way a bicubic kernel does (this zeroes the gradient only of saturated pixels).
        x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=True, align_corners=False)
        x = x.clamp(0, 1)
    if fit == "crop":
        top, left = crop_offset(nh - size, crop), crop_offset(nw - size, crop)
        x = x[..., top:top + size, left:left + size]
    else:  # pad with black *before* normalising, as HPSv2 pads the PIL image
        ph, pw = size - nh, size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    mean = x.new_tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# --- loading helpers ---------------------------------------------------------------------------

def _frozen(module):
    """eval() turns dropout off; requires_grad_(False) keeps every scorer weight out of autograd."""
    return module.eval().requires_grad_(False)


def _not_found(what, src, slot, hub):
    return FileNotFoundError(
        f"{what} not found at {src!r}; download it from the hub repo {hub} and pass its path "
        f"as sources['{slot}'] (--{slot.replace('_', '-')}-path)")


def _pretrained(cls, src, slot, what):
    """cls.from_pretrained for a hub id or a local folder, with one clear error line."""
    try:
        return cls.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise _not_found(what, src, slot, DEFAULT_SOURCES[slot]) from e


def _resolve_file(src, filenames, slot, what):
    """A raw checkpoint file: `src` is the file, a folder holding it, or a hub repo id."""
    if os.path.isfile(src):
        return src
    for name in filenames:
        if os.path.isfile(os.path.join(src, name)):
            return os.path.join(src, name)
    if not os.path.exists(src):  # maybe a hub id (HF_HUB_OFFLINE=1 allows the local cache only)
        from huggingface_hub import hf_hub_download
        for name in filenames:
            try:
                return hf_hub_download(src, name)
            except Exception:
                pass
    raise _not_found(f"{what} '{filenames[0]}'", src, slot, DEFAULT_SOURCES[slot])


def _state_dict(path):
    """weights_only=True: a checkpoint is data, never code. Unwraps {'state_dict': ...}."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


def _load_strict(net, sd, what):
    """load_state_dict that allows only the non-persistent position_ids buffers to be missing."""
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    return net


def _config(cls, config, default):
    """None -> the real-size default; a str -> cls.from_pretrained (hub id or folder); else as is."""
    if config is None:
        return default()
    return cls.from_pretrained(config) if isinstance(config, str) else config


def _pooled(out):
    """transformers 5 get_*_features return an output object; the projection is .pooler_output."""
    return out if torch.is_tensor(out) else out.pooler_output


class MLPHead(nn.Module):
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts and NO activations: the LAION aesthetic
    head and ImageReward's head share this layout (keys layers.{0,2,4,6,7}; REWARDS.md 1.3, 1.5).
    In eval mode it is a single affine map; we keep the layers so the checkpoints load as is."""

    def __init__(self, in_dim=768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x).squeeze(-1)


# --- CLIP-family scorers: CLIPScore, PickScore, Aesthetic, HPSv2.1 ------------------------------

class CLIPBackbone:
    """A frozen transformers CLIPModel + tokenizer, loaded on first use. CLIPScore and Aesthetic
    share one CLIP-L/14 instance; PickScore and HPSv2.1 each hold a ViT-H/14 one.
    `build`, if given, makes the model instead of from_pretrained (HPSv2.1's converted weights)."""

    def __init__(self, model_src, tokenizer_src=None, slot="clip_l", build=None):
        self.model_src, self.tokenizer_src, self.slot, self.build = model_src, tokenizer_src, slot, build
        self.model = self.tokenizer = None

    def load(self, device=None):
        if self.model is None:
            from transformers import AutoTokenizer, CLIPModel
            model = self.build() if self.build else _pretrained(
                CLIPModel, self.model_src, self.slot, "CLIP model")
            tok_src = self.tokenizer_src or self.model_src
            tok_slot = self.slot + "_tokenizer" if self.tokenizer_src else self.slot
            self.tokenizer = _pretrained(AutoTokenizer, tok_src, tok_slot, "CLIP tokenizer")
            self.model = _frozen(model)
        if device is not None:
            self.model.to(device)  # follows the images' device; a no-op once it is there
        return self.model

    def embed(self, images, prompts, fit="crop", mode="bicubic", crop="floor"):
        """L2-normalised projected (image [B,D], text [B,D]) embeddings; text None if no prompts."""
        m = self.load(images.device)
        px = preprocess(images, m.config.vision_config.image_size, fit, mode, crop).to(m.dtype)
        img = F.normalize(_pooled(m.get_image_features(pixel_values=px)).float(), dim=-1)
        if prompts is None:
            return img, None
        # CLIP text attention is causal and pooled at the EOS token, so pad tokens after it never
        # matter: "max_length" (RTDMD CLIPScore, open_clip) == padding=True (PickScore eval).
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt",
                             max_length=m.config.text_config.max_position_embeddings).to(images.device)
        txt = m.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        return img, F.normalize(_pooled(txt).float(), dim=-1)


class CLIPScore:
    """REWARDS.md 1.1: cosine of CLIP-L/14's projected embeddings (= logits_per_image / 100, no
    2.5*max(cos,0) of the CLIPScore paper), ~0.28-0.32. `mode` bilinear: RTDMD's tensor path uses
    torchvision Resize's default, for eval and back-prop alike; `crop` round: its CenterCrop
    (official code: rtdmd/rewards/clip_scorer.py)."""
    name, fit, mode, crop = "clipscore", "crop", "bilinear", "round"

    def __init__(self, backbone):
        self.backbone = backbone

    def cosine(self, images, prompts):
        img, txt = self.backbone.embed(images, prompts, self.fit, self.mode, self.crop)
        return (img * txt).sum(-1)

    def __call__(self, images, prompts):
        return {self.name: self.cosine(images, prompts)}


class PickScore(CLIPScore):
    """REWARDS.md 1.2: logit_scale.exp() * cos on PickScore_v1 (~22-24, the paper's table value),
    returned DIVIDED BY 26 (~0.86-0.92) as RTDMD trains and logs it, so weights 1:1:1 with the
    two cosines make sense. Tables: multiply by PICKSCORE_TABLE_SCALE. `mode` bicubic: its eval
    numbers come from the bicubic PIL processor (RTDMD's BP path used bilinear; < 1% apart).
    `crop` floor: the transformers CLIP processor floors an odd margin."""
    name, mode, crop = "pickscore", "bicubic", "floor"

    def __call__(self, images, prompts):
        cos = self.cosine(images, prompts)
        return {self.name: self.backbone.model.logit_scale.exp() * cos / PICKSCORE_TABLE_SCALE}


class HPSv2(CLIPScore):
    """REWARDS.md 1.4: HPSv2.1 = cosine (no logit scale) of an open_clip ViT-H/14 fine-tune,
    ~0.27-0.35; image resized on its longest side and zero-padded (never cropped)."""
    name, fit, mode = "hpsv2", "pad", "bicubic"


class Aesthetic:
    """REWARDS.md 1.3: LAION aesthetic v2 = MLPHead(L2-normalised CLIP-L/14 image embedding),
    ~5-6 on the AVA 1-10 scale. Ignores the prompt. RTDMD uses it only as a (no-grad) metric; the
    torch preprocessing makes it differentiable anyway. `crop` round: the original predictor
    preprocesses with OpenAI CLIP's torchvision CenterCrop."""
    name, fit, mode, crop = "aesthetic", "crop", "bicubic", "round"
    FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth")  # original, trl mirror name

    def __init__(self, backbone, head_src):
        self.backbone, self.head_src, self.head = backbone, head_src, None

    def __call__(self, images, prompts=None):
        img, _ = self.backbone.embed(images, None, self.fit, self.mode, self.crop)
        if self.head is None:
            path = _resolve_file(self.head_src, self.FILES, "aesthetic_head", "LAION aesthetic head")
            sd = _state_dict(path)
            self.head = _frozen(_load_strict(MLPHead(sd["layers.0.weight"].shape[1]), sd, path))
        return {self.name: self.head.to(img.device)(img)}


# --- HPSv2.1: open_clip ViT-H/14 -> transformers CLIPModel (REWARDS.md 2.1) ----------------------

def hpsv2_clip_config():
    """open_clip ViT-H-14 as a CLIPConfig (= laion/CLIP-ViT-H-14's config.json)."""
    from transformers import CLIPConfig
    return CLIPConfig(projection_dim=1024, text_config=dict(
        hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
        max_position_embeddings=77, vocab_size=49408, hidden_act="gelu"), vision_config=dict(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
        patch_size=14, image_size=224, hidden_act="gelu"))


_OC_TOP = {  # open_clip name -> HF name, copied unchanged
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic, HF's spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# open_clip projects with `x @ P`; nn.Linear computes x @ W.T, so W = P transposed.
_OC_PROJ = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_OC_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openclip_to_hf(sd):
    """open_clip CLIP state dict -> transformers CLIPModel state dict. Raises on unknown keys."""
    out, unknown = {}, []
    for k, v in sd.items():
        k = k.removeprefix("module.")
        block = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        fused = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", k)
        if k in _OC_TOP:
            out[_OC_TOP[k]] = v
        elif k in _OC_PROJ:
            out[_OC_PROJ[k]] = v.t().contiguous()
        elif fused:  # one fused [3D, ...] in-projection, rows ordered q, k, v -> three Linears
            pre = f"{'vision' if fused[1] else 'text'}_model.encoder.layers.{fused[2]}.self_attn."
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{pre}{name}_proj.{fused[3]}"] = part.contiguous()
        elif block and block[3] in _OC_BLOCK:
            tower = "vision" if block[1] else "text"
            out[f"{tower}_model.encoder.layers.{block[2]}.{_OC_BLOCK[block[3]]}.{block[4]}"] = v
        elif k.endswith("attn_mask"):
            pass  # the causal-mask buffer; HF builds its own
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"openclip_to_hf: {len(unknown)} unknown keys, e.g. {unknown[:6]}")
    return out


def load_hpsv2(src, config=None):
    """HPSv2.1 as a frozen transformers CLIPModel. The HPS file holds the whole model, so the
    laion base weights the official code builds first are not needed (REWARDS.md 1.4)."""
    from transformers import CLIPConfig, CLIPModel
    path = _resolve_file(src, ("HPS_v2.1_compressed.pt",), "hpsv2", "HPSv2.1 checkpoint")
    sd = openclip_to_hf(_state_dict(path))  # fp16 in the file; load_state_dict casts to fp32
    return _load_strict(CLIPModel(_config(CLIPConfig, config, hpsv2_clip_config)), sd, path)


# --- ImageReward: BLIP -> transformers BlipVisionModel + BlipTextModel (REWARDS.md 1.5, 2.2) ---

def imagereward_blip_config():
    """BLIP ViT-L/16 + BERT-base 'med' text encoder with cross-attention to the 1024-d image
    tokens (BlipConfig copies vision hidden_size into text encoder_hidden_size)."""
    from transformers import BlipConfig
    return BlipConfig(vision_config=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=16, layer_norm_eps=1e-6), text_config=dict(
        vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12))


class BlipReward(nn.Module):
    """ImageReward's network: image tokens -> text encoder cross-attends to them -> [CLS] -> MLP
    -> z-score. The ITC heads of BLIP (vision_proj, text_proj) are not used by the reward."""

    def __init__(self, config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel
        self.vision = BlipVisionModel(config.vision_config)
        self.text = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.head = MLPHead(config.text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        # HF's last_hidden_state is post-layernormed: the same final norm BLIP's ViT applies
        tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        # is_decoder=False: bidirectional self-attention (BLIP "multimodal" mode); no encoder
        # mask = every image token visible (ImageReward passes an all-ones mask)
        h = self.text(input_ids=input_ids, attention_mask=attention_mask,
                      encoder_hidden_states=tokens, is_decoder=False).last_hidden_state
        return (self.head(h[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


_BLIP_TOP = {  # original name (after "blip.") -> BlipReward name
    "visual_encoder.cls_token": "vision.embeddings.class_embedding",  # [1,1,D] both sides
    "visual_encoder.pos_embed": "vision.embeddings.position_embedding",  # [1,197,D] both sides
    "visual_encoder.patch_embed.proj.weight": "vision.embeddings.patch_embedding.weight",
    "visual_encoder.patch_embed.proj.bias": "vision.embeddings.patch_embedding.bias",
    "visual_encoder.norm.weight": "vision.post_layernorm.weight",
    "visual_encoder.norm.bias": "vision.post_layernorm.bias",
}
# timm block names -> HF BLIP; qkv stays one fused Linear with the same (3, heads, dim) order
_BLIP_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
               "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def blip_to_hf(sd):
    """ImageReward.pt state dict -> BlipReward state dict. Raises on unknown keys."""
    out, unknown = {}, []
    for k, v in sd.items():
        k = k.removeprefix("module.").removeprefix("blip.")
        block = re.match(r"visual_encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if k in _BLIP_TOP:
            out[_BLIP_TOP[k]] = v
        elif block and block[2] in _BLIP_BLOCK:
            out[f"vision.encoder.layers.{block[1]}.{_BLIP_BLOCK[block[2]]}.{block[3]}"] = v
        elif k.endswith("position_ids") or k.startswith(("vision_proj.", "text_proj.")):
            pass  # a buffer HF rebuilds, and BLIP's contrastive heads the reward never uses
        elif k.startswith("text_encoder."):  # HF's BlipTextModel is a port of BLIP's med.py:
            out["text." + k.removeprefix("text_encoder.")] = v  # same names
        elif k.startswith("mlp.layers."):
            out["head." + k.removeprefix("mlp.")] = v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"blip_to_hf: {len(unknown)} unknown keys, e.g. {unknown[:6]}")
    return out


class ImageReward:
    """REWARDS.md 1.5: ImageReward v1.0, a z-scored preference score, ~-2..2 (paper 0.78-1.37).
    Text: bert-base-uncased + [DEC], [ENC] (vocab 30524), max 35 tokens, [CLS] kept first.
    Image: bicubic shortest side 224 + centre crop, like its PIL eval path (RTDMD's BP fallback
    squashed to 224x224 without antialias instead; identical for square images up to antialias).
    `crop` round: the image-reward package's torchvision CenterCrop."""
    name, fit, mode, crop = "imagereward", "crop", "bicubic", "round"

    def __init__(self, src, tokenizer_src, config=None):
        self.src, self.tokenizer_src, self.config = src, tokenizer_src, config
        self.net = self.tokenizer = None

    def load(self, device=None):
        if self.net is None:
            from transformers import AutoTokenizer, BlipConfig
            path = _resolve_file(self.src, ("ImageReward.pt",), "imagereward", "ImageReward checkpoint")
            net = BlipReward(_config(BlipConfig, self.config, imagereward_blip_config))
            self.net = _frozen(_load_strict(net, blip_to_hf(_state_dict(path)), path))
            tok = _pretrained(AutoTokenizer, self.tokenizer_src, "imagereward_tokenizer", "BERT tokenizer")
            tok.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's init_tokenizer: the two extra
            tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})  # ids 30522, 30523
            self.tokenizer = tok
        if device is not None:
            self.net.to(device)
        return self.net

    def __call__(self, images, prompts):
        net = self.load(images.device)
        px = preprocess(images, net.vision.config.image_size, self.fit, self.mode, self.crop)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt",
                             max_length=min(35, net.text.config.max_position_embeddings))
        tok = tok.to(images.device)
        return {self.name: net(px.to(net.head.layers[0].weight.dtype), tok.input_ids, tok.attention_mask)}

# ---------------------------------------------------------------------------------------------
# 3. Weighted multi-reward
# ---------------------------------------------------------------------------------------------

# (multi-reward goes here)
#
# RTDMD scores every sample with several rewards and combines them in two places (ALGORITHM.md
# 5.5, 5.7, 6):
#   * GRPO (score-function part): no gradient, images quantised to uint8 first. Advantages are
#     computed PER REWARD and then weighted (subgrpo.py), so the per-reward tensors are returned
#     alongside their weighted sum.
#   * Reward back-prop (path-wise part, last deterministic step): float images WITH gradient,
#     the weighted sum of the differentiable subset of the GRPO rewards.
# Evaluation scores every metric with weight 1 on uint8 images.

GRPO_WEIGHTS = {"clipscore": 1.0, "hpsv2": 1.0, "pickscore": 1.0}  # the paper adds geneval: 1.0,
# which is not implemented here (it needs an mmdet detector, REWARDS.md 4.1)
BP_CAPABLE = ("clipscore", "pickscore", "hpsv2", "imagereward")  # what RTDMD's BP can score
EVAL_WEIGHTS = {n: 1.0 for n in ("clipscore", "pickscore", "aesthetic", "hpsv2", "imagereward")}


def make_scorers(names, sources=None, cache=None):
    """{name: scorer} for the requested names. Nothing loads yet (scorers are lazy). `cache`
    (a dict) shares scorer objects, so the CLIP-L/14 of clipscore and aesthetic, and every model
    used by both the GRPO and the back-prop reward sets, exists once."""
    src = {**DEFAULT_SOURCES, **(sources or {})}
    cache = {} if cache is None else cache

    def clip_l():
        return cache.setdefault("clip_l", CLIPBackbone(src["clip_l"], slot="clip_l"))

    builders = {
        "clipscore": lambda: CLIPScore(clip_l()),
        "aesthetic": lambda: Aesthetic(clip_l(), src["aesthetic_head"]),
        "pickscore": lambda: PickScore(CLIPBackbone(
            src["pickscore"], src["pickscore_tokenizer"], slot="pickscore")),
        "hpsv2": lambda: HPSv2(CLIPBackbone(
            src["hpsv2"], src["hpsv2_tokenizer"], slot="hpsv2",
            build=lambda: load_hpsv2(src["hpsv2"], src["hpsv2_config"]))),
        "imagereward": lambda: ImageReward(
            src["imagereward"], src["imagereward_tokenizer"], src["imagereward_config"]),
    }
    for n in names:
        if n not in builders:
            raise NotImplementedError(
                f"reward {n!r} is not implemented in this educational code (geneval, hpsv3, ocr "
                f"are out of scope, REWARDS.md 1.6, 4); available: {sorted(builders)}")
        if n not in cache:
            cache[n] = builders[n]()
    return {n: cache[n] for n in names}


class MultiReward:
    """reward(images, prompts) -> {name: Tensor[B] for each weighted name, "weighted": Tensor[B]}

    weighted = sum_k w_k * r_k. quantize=True scores round(255 x)/255 (GRPO, eval); keep it False
    for back-prop, whose gradient it would zero. share=another MultiReward: reuse its scorers
    (and so its models and its sources) for every name they have in common."""

    def __init__(self, weights, sources=None, quantize=False, share=None):
        self.weights, self.quantize = dict(weights), quantize
        self.cache = share.cache if share is not None else {}
        self.scorers = make_scorers(self.weights, sources, self.cache)

    def __call__(self, images, prompts, metadata=None):
        # metadata (one dict per prompt, models.read_prompt_file) is for the scorers that read it
        if self.quantize:
            images = quantize_uint8(images)
        out = {}
        for scorer in self.scorers.values():
            out.update(scorer(images, prompts))
        out["weighted"] = sum(w * out[n] for n, w in self.weights.items())
        return out


def add_source_args(parser):
    """--<slot>-path for every slot of DEFAULT_SOURCES (--clip-l-path, --hpsv2-path, ...), on an
    argparse parser or argument group. train.py and eval.py share this one definition."""
    for slot, default in DEFAULT_SOURCES.items():
        parser.add_argument(f"--{slot.replace('_', '-')}-path", default=None,
                            help=f"local path or hub id (default {default or 'real-size config'})")


def sources_from_args(args):
    """{slot: path} for the --<slot>-path options that were given (the rest keep their default)."""
    return {slot: getattr(args, slot + "_path") for slot in DEFAULT_SOURCES
            if getattr(args, slot + "_path") is not None}


def preflight(reward_set, device):
    """Load every model of a (lazy) reward set now, by scoring one random image, so that a missing
    checkpoint fails before any generation or training. Raises the loaders' one-line errors."""
    with torch.no_grad():
        reward_set(torch.rand(1, 3, 64, 64, device=device), ["preflight"])


def training_rewards(sources=None, weights=GRPO_WEIGHTS):
    """(grpo, bp) reward sets for stage 2, sharing their models. bp = the BP-capable subset of
    the GRPO rewards with the same weights (RTDMD's default "training_reward_fn" mode, REWARDS.md
    0): {clipscore, hpsv2, pickscore} for the paper's weights. Call grpo under torch.no_grad()."""
    grpo = MultiReward(weights, sources, quantize=True)
    bp = MultiReward({n: w for n, w in weights.items() if n in BP_CAPABLE}, sources, share=grpo)
    return grpo, bp


def eval_rewards(sources=None, weights=EVAL_WEIGHTS, share=None):
    """All metrics on uint8 images (ALGORITHM.md 7). Tables: pickscore * PICKSCORE_TABLE_SCALE."""
    return MultiReward(weights, sources, quantize=True, share=share)
