"""
models.py -- WHAT generates: flow-matching conventions, the backbones, LoRA.

Read this file first; every other file uses its conventions. "Official code" is github.com/Harahan/RTDMD (README);
its configs are configs/cold_start/*.yaml (stage 1), configs/rtdmd/*.yaml (stage 2) and configs/inference/*.yaml.

1. Flow-matching conventions (SD3's rectified flow)
   ------------------------------------------------
   sigma in [0, 1] is the noise level, sigma = 1 is pure noise:

       x_sigma = (1 - sigma) * x0 + sigma * eps,       eps ~ N(0, I)

   A velocity network predicts v ~= E[eps - x0 | x_sigma]; the velocity points from data to noise. From a
   velocity we recover both ends of the straight line through x:

       x0_hat  = x - sigma * v
       eps_hat = x + (1 - sigma) * v          check: (1-sigma) x0_hat + sigma eps_hat = x

   With the score S = grad log p_sigma, Tweedie's formula E[(1-sigma) x0 | x] = x + sigma^2 S gives
   v = (x - E[x0|x]) / sigma = -(x + sigma S) / (1 - sigma), and S = -(x + (1-sigma) v)/sigma.
   The transformer's input is the *model timestep* tau = 1000 * sigma of an already shifted sigma. The "shift"
   of SD3 / FLUX is applied exactly once, when the 4-step sampler's raw step list [1000, 750, 500, 250] becomes
   sampler sigmas (`sd3_sigmas`, `flux2_sigmas`; official code: rtdmd/models/sd35.py, `compute_sigmas_sd35`,
   and rtdmd/models/flux2_klein.py, `compute_sigmas_flux2_klein`). Noise levels drawn *inside* the losses are
   never shifted: tau is drawn in [0, 1000] and sigma = tau / 1000.

       backbone (resolution)          sampler sigmas sigma_0 .. sigma_3 (sigma_4 = 0)
       SD3-M, SD3.5-M (any)           1.0, 0.9, 0.75, 0.5            (static shift 3)
       FLUX.2-klein-4B, 512 px        1.0, 0.95809, 0.88398, 0.71750 (shift from the token count)
       FLUX.2-klein-4B, 1024 px       1.0, 0.96738, 0.90814, 0.76720

2. The toy world: a 2-D conditional Gaussian mixture, closed form at every level
   ------------------------------------------------------------------------------
   J = 8 isotropic components with means mu_j on a circle of radius 2 and std s_j = 0.3; prompt c picks
   weights pi_cj ("top": components 0-3 with weights .4 .3 .2 .1, "bottom": 4-7 uniformly, "ring": all 8
   uniformly; the empty prompt, CFG's null branch, the mean of the three rows). Noising a Gaussian component
   keeps it Gaussian, so with V_j(sigma) = (1-sigma)^2 s_j^2 + sigma^2:

       p_sigma(x | c) = sum_j pi_cj N(x; (1-sigma) mu_j, V_j I)             (`Mixture.log_prob`)
       w_j(x)         = pi_cj N(x; (1-sigma) mu_j, V_j I) / p_sigma(x | c)        posterior weights
       m_j(x)         = mu_j + (1-sigma) s_j^2 / V_j (x - (1-sigma) mu_j)         E[x0 | x, j]
       Var[x0 | x, j] = s_j^2 sigma^2 / V_j  (per coordinate)
       E[x0 | x]      = sum_j w_j m_j,     v(x) = (x - E[x0 | x]) / sigma      (`Mixture.velocity`)
       score(x)       = sum_j w_j (-(x - (1-sigma) mu_j) / V_j)                  (`Mixture.score`)

   (sigma is clamped at 1e-4; weights are computed in log space.) The teacher is this exact velocity with CFG
   scale 1, so the teacher *is* p(x|c) and every target is exact. Its reward-tilted versions are mixtures again
   (rewards.py, section 1). The generator and the fake score start from a small MLP flow-matched on exact
   samples (`pretrain_toy_base`), as the real ones start from the teacher's weights. "toy-gauss" is a
   one-Gaussian variant with a shift-only generator, whose stage-2 stationary point is closed form (subgrpo.py,
   section 7).

3. Real backbones: SD3-M, SD3.5-M, FLUX.2-klein-4B, and their tiny offline twins
   ------------------------------------------------------------------------------
   Each wraps a stock diffusers pipeline (`from_pretrained`, hub id or local folder): its text encoders encode,
   its VAE decodes, its transformer is the frozen teacher. The official settings per backbone (stage 1:
   configs/cold_start/{sd3m,sd35m,flux2_4b}.yaml; stage 2: configs/rtdmd/{sd3m,sd35m,flux2_4b}.yaml):

                                     SD3-M              SD3.5-M            FLUX.2-klein-4B
       teacher / fake-score base     sd3-medium         sd3.5-medium       klein-base-4B
       generator base                = teacher          = teacher          klein-4B (distilled)
       train resolution              1024               512                512
       teacher CFG g                 7.0                4.5                4.0
       stage 1: lr (both nets)       3e-5               3e-5               1e-6
       stage 1: batch                9 per GPU x 8 GPUs, 15 000 iterations, TTUR 10, EMA 0.99
       stage 2: GPUs x prompts/GPU   16 x 2             8 x 9              16 x 6
       stage 2: group size K         16                 24                 24
       stage 2: fake lr / chunk      3e-5 / 2           3e-5 / 8           1e-6 / 2
       stage 2: back-prop chunk      1                  1                  2
                                     (official SD3: the whole sub-batch; the same gradient, and
                                     train.py --memory-plan plans ~4 GiB less per 512-px image)
       common: LoRA r 32, alpha 64; CPS eta 0.9; stage 2: generator lr 3e-6, weight decay 1e-4,
       16 sampling iterations per epoch, loss weights PG 1 : DM 1e-3 : BP 1e-4; 1000 epochs
       (the configs say num_epochs 100000, i.e. until stopped; the inference configs load the
       stage-2 checkpoint-1000 and the stage-1 checkpoint-15000).

   Evaluation runs every backbone at 1024 px (configs/inference/*.yaml), so FLUX.2 is tested on other sigmas
   than it trained on (section 1). The SD3 text condition is CLIP-L + CLIP-G + T5 ([B, 77 + 128, 4096]) plus
   pooled CLIP projections [B, 2048]; FLUX.2-klein's is Qwen3 hidden states of layers 9, 18, 27 with text
   position ids. SD3 takes tau = 1000 sigma; FLUX.2's transformer multiplies by 1000 itself, so it gets sigma.
   FLUX.2 latents are the VAE latents BatchNorm-normalised and 2x2-patchified to 128 channels. The tiny twins
   (tiny-sd3, tiny-sd35, tiny-flux2) are random-init pipelines of the same classes, written with
   `save_pretrained` and loaded through the same `from_pretrained` path, so every line runs in the CPU tests.

4. LoRA, hand-written (official code: rtdmd/utils/lora.py)
   ---------------------------------------------------------
   W x + b -> W x + b + (alpha / r) B A x, A [r, in], B [out, r] = 0 at init. Stage 1: A ~ N(0, 1/r^2) (peft's
   "gaussian"). Stage 2 merges the stage-1 EMA LoRA into the weights and adds a fresh LoRA with A ~ N(0, 1)
   (`inject_lora`). The trainable A, B are float32, or bf16 as in the official code (train.py --lora-dtype).
   Files use the diffusers/PEFT layout, `transformer.<module>.lora_A.weight` with r, lora_alpha and
   target_modules in the safetensors metadata, so a stock pipeline's `load_lora_weights` (which needs peft)
   applies them with the right alpha/r; `export_merged` needs no extra library. read_lora also reads the
   official files (flat .pt, peft folders), and stack_loras writes a released model's two LoRAs as one exact
   LoRA of rank 64 (rtdmd/inference.py merges them in order).

5. The backbone interface, and `load(name)`
   ----------------------------------------
   `load(name, ...)` returns a backbone object. The loss files (acdmd.py, subgrpo.py) and the samplers
   (sample.py) only talk to a backbone through these members, so they never know whether they run on the
   2-D toy or on SD3:

       bb.name, bb.prompts      str; list[str], the default training prompts
       bb.latent_shape          tuple, shape of one sample's latent, e.g. (2,) or (16, 64, 64)
       bb.sigmas                Tensor[5], the 4-step sampler sigmas with sigma_4 = 0 appended
       bb.guidance              float, the teacher's CFG scale g used in the DMD losses
       bb.teacher               frozen velocity nn.Module (eval mode, requires_grad False)
       bb.make_student(role)    trainable velocity nn.Module for role "generator" or "fake", initially
                                equal to the base model
       bb.encode(prompts)       list[str] -> cond, a dict of batch-first tensors; "" encodes CFG's
                                unconditional branch
       bb.velocity(net, x, sigma, cond)
                                net's velocity at latents x [B, *latent_shape] and noise levels sigma [B]
                                (float, in [0, 1]), converted to the model timestep
       bb.noise(n, generator)   Tensor[n, *latent_shape] of N(0, I) in float32
       bb.decode(x)             images [B, 3, H, W] in [0, 1], differentiable
       bb.prompt_metadata       list[dict] aligned with bb.prompts (real backbones only; {} each unless the
                                prompts came from a .jsonl, see read_prompt_file)
       bb.teacher_sigmas(steps) real backbones: the stock pipeline's sigmas for `steps` steps
       bb.pipeline_latents(prompts, x, steps, guidance)
                                the stock pipeline itself from latents x (VAE latents out)

   plus `cfg_velocity` (section 1) for the classifier-free-guided teacher.
"""
import copy
import hashlib
import json
import math
import os
import pickle
import re

import torch
import torch.nn as nn
from tqdm import tqdm

# --- 1. Flow-matching conventions ------------------------------------------------------------


def bcast(sigma, x):
    """Reshape a per-sample sigma [B] (or a float) so it broadcasts against x [B, ...]."""
    if not torch.is_tensor(sigma):
        return torch.tensor(float(sigma), dtype=x.dtype, device=x.device)
    return sigma.to(x.device).reshape(-1, *([1] * (x.dim() - 1)))


def add_noise(x0, eps, sigma):
    """Forward path x_sigma = (1 - sigma) x0 + sigma eps (section 1)."""
    s = bcast(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0, eps):
    """Flow-matching regression target v = eps - x0 (velocity points data -> noise)."""
    return eps - x0


def x0_from_velocity(x, v, sigma):
    """x0_hat = x - sigma v."""
    return x - bcast(sigma, x) * v


def eps_from_velocity(x, v, sigma):
    """eps_hat = x + (1 - sigma) v."""
    return x + (1 - bcast(sigma, x)) * v


def velocity_from_score(x, score, sigma):
    """v = -(x + sigma score) / (1 - sigma) from score = grad log p_sigma(x) (Tweedie, section 1)."""
    s = bcast(sigma, x)
    return -(x + s * score) / (1 - s)


def sigma_to_timestep(sigma):
    """SD3-style model timestep tau = 1000 sigma (no shift here: shift is applied once, below)."""
    return sigma * 1000.0


def timestep_to_sigma(tau):
    return tau / 1000.0


DENOISING_STEP_LIST = (1000, 750, 500, 250)


def sd3_sigmas(step_list=DENOISING_STEP_LIST, shift=3.0):
    """Static shift of SD3 / SD3.5: u = step/1000, sigma = shift u / (1 + (shift - 1) u).
    Returns Tensor[len+1] with sigma_N = 0 appended. [1000,750,500,250] -> [1, .9, .75, .5, 0]."""
    u = timestep_to_sigma(torch.tensor(step_list, dtype=torch.float64))
    s = shift * u / (1 + (shift - 1) * u)
    s = torch.round(s * 1e6) / 1e6  # the official code rounds to 6 decimals
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def flux2_empirical_mu(image_seq_len, num_steps):
    """FLUX.2's resolution-dependent shift mu (the FLUX.2 pipeline's): piecewise linear in the token
    count, and linear in the number of steps between the (10 steps) and (200 steps) lines."""
    m_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return m_200
    a = (m_200 - (8.73809524e-05 * image_seq_len + 1.89833333)) / 190.0
    return a * num_steps + (m_200 - 200.0 * a)


def flux2_sigmas(step_list=DENOISING_STEP_LIST, resolution=512):
    """FLUX.2-klein dynamic shift: sigma = e^mu / (e^mu + (1/u - 1)), image_seq_len = (res/16)^2.
    512 px -> [1, .95809, .88398, .71750, 0]; 1024 px -> [1, .96738, .90814, .76720, 0]."""
    mu = flux2_empirical_mu((resolution // 16) ** 2, len(step_list))
    u = timestep_to_sigma(torch.tensor(step_list, dtype=torch.float64))
    s = math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def cfg_velocity(bb, net, x, sigma, cond, null_cond, g):
    """CFG v = v(null) + g (v(c) - v(null)), null = the encoded "", in one forward over [null; cond]."""
    if g == 1.0:
        return bb.velocity(net, x, sigma, cond)
    both = {k: torch.cat([null_cond[k], cond[k]]) for k in cond}
    v = bb.velocity(net, torch.cat([x, x]), torch.cat([sigma, sigma]), both)
    v_null, v_cond = v.chunk(2)
    return v_null + g * (v_cond - v_null)


def cond_select(cond, idx):
    """Index every tensor of a condition dict along the batch dimension."""
    return {k: v[idx] for k, v in cond.items()}


# --- 2. The toy backbone: a 2-D conditional Gaussian mixture ---------------------------------


class Mixture:
    """An isotropic Gaussian mixture, closed form at every noise level (section 2). means [J, d], stds [J],
    weights [C, J] (one row per condition; rows sum to 1)."""

    def __init__(self, means, stds, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)

    def sample(self, c, sigma=0.0, generator=None):
        """Exact samples of p_sigma(x | c) for a LongTensor of conditions c [B]."""
        j = torch.multinomial(self.weights[c], 1, generator=generator).squeeze(1)
        x0 = self.means[j] + self.stds[j, None] * torch.randn(len(c), self.means.shape[1], generator=generator,
                                                              dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        return ((1 - sigma) * x0 + sigma * eps).float()

    def _posterior(self, x, sigma, c):
        # log pi_cj N(x; (1-sigma) mu_j, V_j I) of each component j at level sigma, and their softmax w_j
        x = x.double()
        s = bcast(sigma, x).clamp(min=1e-4).double()  # [B, 1]
        V = (1 - s) ** 2 * self.stds[None] ** 2 + s ** 2  # [B, J]
        diff = x[:, None, :] - (1 - s)[:, :, None] * self.means[None]  # [B, J, d]
        d = x.shape[1]
        logw = (self.weights[c].clamp_min(1e-300).log()
                - 0.5 * (diff ** 2).sum(-1) / V - 0.5 * d * torch.log(2 * math.pi * V))
        return logw, torch.softmax(logw, dim=1), V, diff, s

    def log_prob(self, x, sigma, c):
        """log p_sigma(x | c)."""
        return torch.logsumexp(self._posterior(x, sigma, c)[0], dim=1)

    def score(self, x, sigma, c):
        """grad_x log p_sigma(x | c) = sum_j w_j(x) * (-(x - (1 - sigma) mu_j) / V_j)."""
        _, w, V, diff, _ = self._posterior(x, sigma, c)
        return (w[:, :, None] * (-diff / V[:, :, None])).sum(1).to(x.dtype)

    def posterior_x0(self, x, sigma, c):
        """E[x0 | x_sigma] = sum_j w_j m_j with m_j = mu_j + (1-sigma) s_j^2 / V_j (x - (1-sigma) mu_j)."""
        _, w, V, diff, s = self._posterior(x, sigma, c)
        m = self.means[None] + ((1 - s) * self.stds[None] ** 2 / V)[:, :, None] * diff
        return (w[:, :, None] * m).sum(1).to(x.dtype), w, m, V

    def velocity(self, x, sigma, c):
        """Exact flow velocity v = (x - E[x0 | x]) / sigma (sigma clamped at 1e-4)."""
        return (x - self.posterior_x0(x, sigma, c)[0]) / bcast(sigma, x).clamp(min=1e-4)


def toy_mixture(num_components=8, radius=2.0, std=0.3):
    """The toy world of section 2 ('top' has *unequal* weights, so mode occupancy is a real test)."""
    J = num_components
    ang = torch.arange(J, dtype=torch.float64) * 2 * math.pi / J
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    w = torch.zeros(3, J, dtype=torch.float64)
    w[0, :4], w[1, 4:], w[2, :] = torch.tensor([0.4, 0.3, 0.2, 0.1]), 0.25, 1.0 / J
    weights = torch.cat([w, w.mean(0, keepdim=True)])
    return Mixture(means, torch.full((J,), std), weights)


TOY_PROMPTS = ("top", "bottom", "ring")


class ExactVelocity(nn.Module):
    """The toy teacher: the exact mixture velocity as a parameter-free module, net(x, sigma, c)."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, sigma, c):
        return self.mixture.velocity(x, sigma, c)


class ToyMLP(nn.Module):
    """Velocity MLP f(x, sigma, c): [x, Fourier(sigma), one-hot(c)] -> 3 x width SiLU -> d. angles=K adds polar
    features [r, cos k phi, sin k phi], k = 1..K: the modes differ by angle only, and a plain MLP on (x, y)
    resolves 8 of them on a circle slowly (README, "what limits the 4-step generator")."""

    def __init__(self, dim=2, num_cond=4, width=128, depth=3, angles=0):
        super().__init__()
        self.num_cond, self.angles = num_cond, angles
        self.register_buffer("freqs", torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi)
        layers, w_in = [], dim + 8 + 1 + num_cond + (1 + 2 * angles if angles else 0)
        for _ in range(depth):
            layers += [nn.Linear(w_in, width), nn.SiLU()]
            w_in = width
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x, sigma, c):
        s = sigma.reshape(-1, 1).to(x.dtype)
        feats = [x, s, torch.sin(s * self.freqs), torch.cos(s * self.freqs),
                 nn.functional.one_hot(c, self.num_cond).to(x.dtype)]
        if self.angles:
            k = torch.arange(1, self.angles + 1, dtype=x.dtype, device=x.device)
            phi = torch.atan2(x[:, 1:2], x[:, 0:1]) * k
            feats += [x.norm(dim=1, keepdim=True), phi.cos(), phi.sin()]
        return self.net(torch.cat(feats, 1))


class ToySteps(nn.Module):
    """One ToyMLP copy per sampler step (train.py --toy-per-step, a diagnostic of interference between steps),
    picked by the call's sigma, which all its samples share (the fake score's sigmas never reach it)."""

    def __init__(self, base, sigmas):
        super().__init__()
        self.register_buffer("sigmas", torch.as_tensor(sigmas[:-1], dtype=torch.float32).clone())
        self.nets = nn.ModuleList(copy.deepcopy(base) for _ in range(len(sigmas) - 1))

    def forward(self, x, sigma, c):
        k = int((self.sigmas - sigma.reshape(-1)[0].float()).abs().argmin())
        return self.nets[k](x, sigma, c)


def pretrain_toy_base(mixture, steps=2000, batch=512, lr=1e-3, width=128, seed=0, progress=False,
                      depth=3, angles=0):
    """The toy's "pretrained base model": plain flow matching (minRF-style) on exact samples; it initialises
    the generator and the fake score, as the teacher's weights do for real (section 3)."""
    g, C = torch.Generator().manual_seed(seed), mixture.weights.shape[0]
    with torch.random.fork_rng():  # the init from `seed` too: torch seeds its global RNG at random
        torch.manual_seed(seed)
        net = ToyMLP(num_cond=C, width=width, depth=depth, angles=angles)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc="pretrain toy base", disable=not progress):
        c = torch.randint(0, C, (batch,), generator=g)
        x0 = mixture.sample(c, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(batch, generator=g)
        v = net(add_noise(x0, eps, sigma), sigma, c)
        loss = ((v - velocity_target(x0, eps)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


class ToyBackbone:
    """The toy world of section 2 behind the backbone interface; pretrain_toy_base is cached as
    `toy_base_w<width>[_a<K>].pt` in `cache_dir` (a cached file wins over pretrain_steps / pretrain_batch / depth)."""

    name = "toy"
    latent_shape = (2,)

    def __init__(self, cache_dir=None, guidance=1.0, width=128, pretrain_steps=2000, mixture=None,
                 device="cpu", progress=False, pretrain_batch=512, depth=3, angles=0, exact_prefix=False,
                 per_step=False, **unused):
        self.mixture = mixture if mixture is not None else toy_mixture()
        self.prompts, self.device = list(TOY_PROMPTS), torch.device(device)
        self.guidance = guidance  # g = 1: the CFG teacher *is* p(x|c), so targets stay exact
        self.sigmas = sd3_sigmas()
        # exact_prefix (train.py --toy-exact-prefix): the last step's input is an exact sample of p_{sigma_{K-1}}(x|c)
        # instead of the generator's own steps 1..K-1 (prefix_state)
        self.exact_prefix, self.per_step = exact_prefix, per_step
        self.teacher = ExactVelocity(self.mixture).eval().requires_grad_(False)
        path = cache_dir and os.path.join(cache_dir, f"toy_base_w{width}" + (f"_a{angles}" if angles else "") + ".pt")
        if path and os.path.exists(path):
            ck = load_checkpoint(path)
            self.base = ToyMLP(num_cond=self.mixture.weights.shape[0], width=ck["width"],
                               depth=ck.get("depth", 3), angles=ck.get("angles", 0))
            self.base.load_state_dict(ck["state_dict"])
        else:
            self.base = pretrain_toy_base(self.mixture, steps=pretrain_steps, batch=pretrain_batch,
                                          width=width, depth=depth, progress=progress, angles=angles)
            if path:
                os.makedirs(cache_dir, exist_ok=True)
                torch.save(dict(width=width, depth=depth, angles=angles, state_dict=self.base.state_dict()), path + ".tmp")
                os.replace(path + ".tmp", path)
        self.base.eval().requires_grad_(False)

    def make_student(self, role):
        net = copy.deepcopy(self.base)
        if self.per_step and role == "generator":
            net = ToySteps(net, self.sigmas)
        return net.to(self.device).train().requires_grad_(True)

    def encode(self, prompts):
        """Prompt strings -> condition index; "" is the unconditional (CFG null) branch."""
        names = self.prompts + [""]
        if not set(prompts) <= set(names):
            raise ValueError(f"unknown toy prompt in {prompts!r}; the toy knows {self.prompts} and '' (unconditional)")
        return {"c": torch.tensor([names.index(p) for p in prompts], dtype=torch.long, device=self.device)}

    def velocity(self, net, x, sigma, cond):
        return net(x, sigma.to(x.dtype), cond["c"])

    def noise(self, n, generator=None):
        return torch.randn(n, *self.latent_shape, generator=generator).to(self.device)

    def prefix_state(self, cond, generator=None):
        """An exact sample of p_{sigma_{K-1}}(x|c), the last step's input (--toy-exact-prefix)."""
        return self.mixture.sample(cond["c"].cpu(), float(self.sigmas[-2]), generator=generator).float().to(self.device)

    def decode(self, x):
        """The toy has no VAE: a 'sample' is the 2-D point itself (rewards score the point)."""
        return x


class ShiftVelocity(ExactVelocity):
    """The "toy-gauss" generator G(x, sigma, c) = v_teacher(x, sigma, c) + b, b learnable: it moves its output mean
    only, linearly in b (so its stage-2 stationary point is closed form, subgrpo.py, section 7)."""

    def __init__(self, mixture, dim=2):
        super().__init__(mixture)
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x, sigma, c):
        return super().forward(x, sigma, c).to(x.dtype) + self.b


class ToyGaussBackbone(ToyBackbone):
    """"toy-gauss": a one-Gaussian teacher, a shift-only generator (ShiftVelocity), the fake score still the
    flow-matched MLP (the exact-decomposition check, subgrpo.py, section 7)."""

    name = "toy-gauss"

    def __init__(self, **kw):  # the teacher: N((0.5, -0.5), 0.5^2 I), the same for all 4 conditions
        gauss = Mixture(torch.tensor([(0.5, -0.5)], dtype=torch.float64), torch.tensor([0.5]),
                        torch.ones(len(TOY_PROMPTS) + 1, 1, dtype=torch.float64))
        super().__init__(mixture=gauss, **kw)
        self.prompts = ["gauss"]  # one prompt: a GRPO group is then every sample of the epoch

    def make_student(self, role):
        if role == "generator":
            return ShiftVelocity(self.mixture).to(self.device).train()
        return super().make_student(role)

# --- 3. Real backbones: SD3-M, SD3.5-M, FLUX.2-klein-4B, and their tiny offline twins --------

# Memory: the teacher *is* pipe.transformer, and a LoRA student is a `shared_copy` of its base (the teacher's own
# frozen tensors plus new LoRA parameters). Merging a LoRA (stage 2) writes new tensors for the merged Linears only,
# so a shared teacher is never modified; only full fine-tuning (lora_rank=0) pays for a real copy. FLUX.2 loads one
# extra transformer, the distilled generator base (klein-4B and klein-base-4B share text encoder and VAE).

SPECS = {  # name -> (family, default pretrained, generator pretrained, CFG g, train resolution)
    "sd3-medium": ("sd3", "stabilityai/stable-diffusion-3-medium-diffusers", None, 7.0, 1024),
    "sd3.5-medium": ("sd3", "stabilityai/stable-diffusion-3.5-medium", None, 4.5, 512),
    "flux2-klein-4b": ("flux2", "black-forest-labs/FLUX.2-klein-base-4B", "black-forest-labs/FLUX.2-klein-4B", 4.0, 512),
    "tiny-sd3": ("sd3", None, None, 7.0, 32),
    "tiny-sd35": ("sd3", None, None, 4.5, 32),
    "tiny-flux2": ("flux2", None, None, 4.0, 32),
    "mini-sd3": ("sd3", None, None, 2.0, 32),  # section 7: `python models.py --pretrain mini-sd3` builds it
}
DEFAULT_PROMPTS = ["a photo of a cat", "a red apple on a wooden table", "a lighthouse at sunset",
                   "an astronaut riding a horse", "a bowl of ramen, studio lighting", "a watercolor painting of a fox",
                   "two dogs playing in the snow", "a city skyline at night"]


def shared_copy(net):
    """A copy of `net` sharing its parameters and buffers (deepcopy with a pre-filled memo): wrapping its Linears
    with LoRA leaves `net` untouched."""
    memo = {id(t): t for t in list(net.parameters()) + list(net.buffers())}
    return copy.deepcopy(net, memo)


def load_pipeline(cls, pretrained, flag="--pretrained", **kw):
    """cls.from_pretrained; a missing / wrong id or folder exits with one actionable line (no traceback).
    low_cpu_mem_usage (with accelerate) loads the weights straight in `dtype`: no float32 host copy of a
    multi-GB transformer per rank before the bf16 cast."""
    try:
        return cls.from_pretrained(pretrained, low_cpu_mem_usage=True, **kw)
    except (OSError, ValueError) as e:
        p, why = str(pretrained), type(e).__name__
        fix = f"pass {flag} with a diffusers folder (by save_pretrained or `huggingface-cli download`) or a hub id"
        if os.path.isdir(p):
            msg = f"folder {p!r} holds no diffusers {cls.__name__} ({why}): {fix}"
        elif os.path.isabs(p) or p.startswith(".") or p.count("/") != 1:
            msg = f"folder {p!r} does not exist: {fix}"
        else:
            msg = (f"hub id {p!r} is not in the local Hugging Face cache and could not be fetched "
                   f"({why}): log in with `huggingface-cli login`, accept the model's licence, and "
                   f"run `huggingface-cli download {p}`; or {fix}")
        raise SystemExit(f"error: {msg}") from None


class DiffusersBackbone:
    """What SD3 and FLUX.2 share: loading, the frozen teacher, the students, text, the stock pipeline, the VAE."""

    text_cache = None  # {field: host tensor [P, ...]} after cache_text_embeddings
    text_device = None  # where the text encoders run: the backbone's device until cached
    generator_base_merged = False  # make_student merged a LoRA into the generator base itself

    def __init__(self, name, pipe, guidance, resolution, device, dtype, generator_base=None,
                 gradient_checkpointing=False, lora_rank=32, lora_alpha=64, prompts=None,
                 prompt_metadata=None, lora_dtype=torch.float32, **unused):
        self.name, self.pipe, self.guidance, self.resolution = name, pipe, guidance, resolution
        self.device, self.dtype = torch.device(device), dtype
        self.gradient_checkpointing, self.lora_rank, self.lora_alpha = gradient_checkpointing, lora_rank, lora_alpha
        self.lora_dtype = lora_dtype  # the trainable (master) weights: LoRA, or the full copy
        self.prompts = list(prompts or DEFAULT_PROMPTS)
        # one dict per training prompt (read_prompt_file) for the rewards that need it (GenEval)
        self.prompt_metadata = list(prompt_metadata) if prompt_metadata else [{} for _ in self.prompts]
        assert len(self.prompt_metadata) == len(self.prompts), "one metadata dict per prompt"
        # diffusers 0.42.1's SD3Transformer2DModel.from_pretrained(dtype=bf16) without accelerate silently stays
        # float32, so cast by hand (a no-op with low_cpu_mem_usage)
        pipe.transformer.to(dtype)
        pipe.to(self.device)
        for m in pipe.components.values():  # everything frozen; students get fresh trainables
            if isinstance(m, nn.Module):
                m.eval().requires_grad_(False)
        self.teacher = pipe.transformer
        self.generator_base = self.teacher if generator_base is None else \
            generator_base.to(self.device, dtype).eval().requires_grad_(False)
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # 8 for the real VAEs
        step = 2 * self.vae_scale  # VAE factor x 2x2 patches (SD3 patch 2, FLUX.2 packing)
        assert resolution % step == 0, f"resolution must be a multiple of {step}"
        side = resolution // (self.packing * self.vae_scale)  # FLUX.2: 2x2 VAE latents a channel
        self.latent_shape = (pipe.transformer.config.in_channels, side, side)  # klein: 4 x 32 = 128

    def make_student(self, role, stage=1, merge=None):
        """The trainable velocity net for role "generator" or "fake" (sections 3, 4): base + LoRA of stage 1
        (equal to the base at init), or base + `merge` (the previous stage's LoRA file / state dict, or a list
        merged in order) folded into the weights + the fresh LoRA of stage 2. lora_rank=0: full fine-tuning,
        every weight of a real copy trains, in self.lora_dtype."""
        base = self.generator_base if role == "generator" else self.teacher
        net = copy.deepcopy(base).to(self.lora_dtype).requires_grad_(True) if self.lora_rank == 0 \
            else shared_copy(base)
        merges = [] if merge is None else merge if isinstance(merge, (list, tuple)) else [merge]
        # FLUX.2's generator base (klein-4B) is read by nothing but this student: merge into its own tensors,
        # so the unmerged 5.3 GiB of Linear weights are not kept
        in_place = bool(merges) and base is not self.teacher and self.lora_rank > 0
        assert not (in_place and self.generator_base_merged), \
            "the generator base already holds a merged LoRA; load the backbone again"
        self.generator_base_merged |= in_place
        for lora in merges:
            merge_lora(load_lora(net, lora), in_place)
        if self.lora_rank > 0:
            inject_lora(net, lora_targets(net, self.family), self.lora_rank, self.lora_alpha,
                        init="gaussian" if stage == 1 else "normal", dtype=self.lora_dtype)
        if self.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        return net.train()

    noise = ToyBackbone.noise

    def encode(self, prompts):
        """Prompt strings -> cond (the subclass's encode_text). With the cache, rows of the host tensors moved
        to the device; a prompt outside it is encoded live where the encoders are."""
        if self.text_cache is not None and all(p in self.text_rows for p in prompts):
            rows = torch.tensor([self.text_rows[p] for p in prompts], dtype=torch.long)
            return {k: v[rows].to(self.device) for k, v in self.text_cache.items()}
        return {k: v.to(self.device) for k, v in self.encode_text(prompts, self.text_device or self.device).items()}

    def cache_text_embeddings(self, batch=16):
        """Encode the training prompts and "" once, keep the embeddings in host memory, and move the text encoders
        (T5-XXL 8.9 GiB, Qwen3-4B 7.5 GiB in bf16) to the CPU: training reads cache rows instead of re-encoding.
        Host memory per prompt: tokens x width x 2 bytes in bf16 (SD3 205 x 4096: 1.6 MiB; FLUX.2 512 x 7680:
        7.5 MiB), so it suits prompt sets of thousands, not the 25k of stage 1. Returns bytes."""
        prompts = list(dict.fromkeys([""] + self.prompts))
        parts = [self.encode_text(prompts[i:i + batch], self.device) for i in range(0, len(prompts), batch)]
        self.text_cache = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}
        self.text_rows = {p: i for i, p in enumerate(prompts)}
        for name, m in self.pipe.components.items():
            if name.startswith("text_encoder") and isinstance(m, nn.Module):
                m.to("cpu")
        self.text_device = torch.device("cpu")
        return sum(v.numel() * v.element_size() for v in self.text_cache.values())

    def teacher_sigmas(self, steps):
        """The stock pipeline's sigmas for `steps` Euler steps (0 appended; sample.py --teacher), from a fresh
        copy of its scheduler."""
        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        if self.family == "sd3":  # `steps` timesteps from 1000 to 1000 sigma_min, static shift
            sched.set_timesteps(num_inference_steps=steps)
        else:  # u = linspace(1, 1/steps, steps), then the dynamic shift with mu(token count, steps)
            mu = flux2_empirical_mu(self.latent_shape[1] * self.latent_shape[2], steps)
            sched.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist(), mu=mu)
        return sched.sigmas.float().cpu()

    @torch.no_grad()
    def pipeline_latents(self, prompts, x, steps, guidance=None):
        """The stock pipeline (the teacher, `steps` Euler steps with CFG `guidance`, default g) from our latents x,
        on self.encode's embeddings: its VAE latents (output_type="latent"), which decode_vae decodes."""
        c, null = self.encode(prompts), self.encode([""] * len(prompts))
        kw = dict(prompt_embeds=c["prompt_embeds"], negative_prompt_embeds=null["prompt_embeds"])
        if self.family == "sd3":
            kw.update(pooled_prompt_embeds=c["pooled_projections"],
                      negative_pooled_prompt_embeds=null["pooled_projections"])
        return self.pipe(latents=x, num_inference_steps=steps, height=self.resolution, width=self.resolution,
                         guidance_scale=self.guidance if guidance is None else guidance, output_type="latent",
                         **kw).images

    def decode(self, x):
        """Differentiable: our latents -> images [B, 3, H, W] in [0, 1] (section 3)."""
        return self.decode_vae(self.to_vae_latents(x))

    def decode_vae(self, z):
        """VAE latents -> VAE decode (SD3: z / scaling + shift first), [-1, 1] -> [0, 1]."""
        vae = self.pipe.vae
        if self.family == "sd3":
            z = z / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def to_vae_latents(self, x):
        """Sampler latents -> the VAE's own latents (what output_type="latent" returns); SD3's are the same."""
        return x


class SD3Backbone(DiffusersBackbone):
    """SD3-Medium / SD3.5-Medium (section 3): latents [B, 16, H/8, W/8]."""
    family, packing = "sd3", 1

    def __init__(self, name, pipe, **kw):
        super().__init__(name, pipe, **kw)
        cfg = pipe.scheduler.config  # static shift 3.0 for both SD3 checkpoints
        assert not cfg.get("use_dynamic_shifting"), "SD3 schedules here assume a static shift"
        self.sigmas = sd3_sigmas(shift=cfg["shift"])
        # the official code caps T5 at 128 tokens (205 = 77 + 128); tiny twins have fewer
        self.max_sequence_length = min(128, pipe.tokenizer_3.model_max_length)

    @torch.no_grad()
    def encode_text(self, prompts, device):
        """pipe.encode_prompt with CFG off: "" gives exactly the pipeline's negative branch."""
        pe, _, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, device=device,
                                                   do_classifier_free_guidance=False,
                                                   max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": pe, "pooled_projections": pooled}

    def velocity(self, net, x, sigma, cond):
        """SD3 takes the model timestep tau = 1000 sigma (section 1)."""
        tau = sigma_to_timestep(sigma.to(self.device, torch.float32))
        return net(hidden_states=x.to(self.dtype), timestep=tau, encoder_hidden_states=cond["prompt_embeds"],
                   pooled_projections=cond["pooled_projections"], return_dict=False)[0].float()


class Flux2Backbone(DiffusersBackbone):
    """FLUX.2-klein (section 3). Our latent x is the BatchNorm-normalised, 2x2-patchified VAE latent as an image
    [B, 128, H/16, W/16]; `velocity` packs it into tokens [B, h*w, 128] with position ids (0, h, w, 0), text ids
    (0, 0, 0, l), and unpacks the output again."""
    family, packing = "flux2", 2

    def __init__(self, name, pipe, text_layers=(9, 18, 27), **kw):
        super().__init__(name, pipe, **kw)
        cfg = pipe.scheduler.config  # klein: dynamic, exponential shift from the token count
        assert cfg.get("use_dynamic_shifting") and cfg.get("time_shift_type", "exponential") == \
            "exponential" and not cfg.get("shift_terminal"), f"unexpected FLUX.2 scheduler {cfg}"
        # flux2_sigmas counts tokens as (res/16)^2; hand it the resolution with our token count
        self.sigmas = flux2_sigmas(resolution=16 * self.latent_shape[1])
        self.text_layers = tuple(text_layers)
        self.max_sequence_length = min(512, pipe.tokenizer.model_max_length)

    @torch.no_grad()
    def encode_text(self, prompts, device):
        """Qwen3 hidden states of `text_layers` [B, L, 3 * hidden] and text ids [B, L, 4]."""
        pe, ids = self.pipe.encode_prompt(prompt=list(prompts), device=device, text_encoder_out_layers=self.text_layers,
                                          max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": pe, "txt_ids": ids}

    def velocity(self, net, x, sigma, cond):
        """FLUX.2's transformer multiplies the timestep by 1000 itself, so it gets sigma (diffusers'
        transformer_flux2.py: `timestep * 1000`; section 1)."""
        B, C, h, w = x.shape
        tokens = x.to(self.dtype).flatten(2).transpose(1, 2)  # [B, h*w, C], row-major
        img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w),
                                       torch.arange(1)).to(self.device)  # [h*w, 4]
        v = net(hidden_states=tokens, timestep=sigma.to(self.device, self.dtype), guidance=None,
                encoder_hidden_states=cond["prompt_embeds"], txt_ids=cond["txt_ids"],
                img_ids=img_ids, return_dict=False)[0]
        return v.transpose(1, 2).reshape(B, C, h, w).float()

    def to_vae_latents(self, x):
        """Undo the BatchNorm normalisation (z std + mean, the VAE's running stats), then un-patchify
        [B, 4c, h, w] -> [B, c, 2h, 2w] (section 3)."""
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
        z = x.float() * std + mean
        B, C, h, w = z.shape  # channel index = c*4 + 2*dy + dx (diffusers' _patchify_latents)
        z = z.reshape(B, C // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(B, C // 4, 2 * h, 2 * w)


def build_tiny(name, folder):
    """Random-init twin of a real pipeline (section 3), saved with save_pretrained into `folder`. Fixed seeds,
    in-memory tokenizers, no network. tiny-flux2 writes two pipelines, base/ and distilled/ (another transformer
    seed), so that generator != teacher as for klein."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer,
                              Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM, T5Config,
                              T5EncoderModel, T5Tokenizer)
    import diffusers as D
    chars = sorted(ByteLevel.alphabet())

    def seeded(seed, cls, *args, **kw):  # each module's random init from its own fixed seed
        torch.manual_seed(seed)
        return cls(*args, **kw)
    sched = dict(num_train_timesteps=1000, shift=3.0)
    vae_kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=16, use_quant_conv=False, use_post_quant_conv=False)
    tmp = f"{folder}.tmp{os.getpid()}"
    if name in ("tiny-sd3", "tiny-sd35"):
        clip_vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
        tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(clip_vocab)}, merges=[], model_max_length=16)
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [
            p for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-" for p in (("\u2581" + c, -3.0), (c, -4.0))]
        tok3 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=32)
        clip_cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
        te1, te2 = (seeded(i, CLIPTextModelWithProjection, clip_cfg) for i in (0, 1))
        te3 = seeded(2, T5EncoderModel, T5Config(
            vocab_size=len(tok3), d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, decoder_start_token_id=0,
            eos_token_id=1))
        extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if name == "tiny-sd35" else {}
        tr = seeded(3, D.SD3Transformer2DModel, sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                    num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                    caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16, **extra)
        vae = seeded(4, D.AutoencoderKL, **vae_kw, shift_factor=0.0609, scaling_factor=1.5035)
        D.StableDiffusion3Pipeline(transformer=tr, scheduler=D.FlowMatchEulerDiscreteScheduler(**sched), vae=vae,
                                   text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                   text_encoder_3=te3, tokenizer_3=tok3).save_pretrained(tmp)
    elif name == "tiny-flux2":
        tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(["<|endoftext|>"] + chars)},
                             merges=[], model_max_length=64)
        tok.add_tokens(["<|im_start|>", "<|im_end|>", "<think>", "</think>"], special_tokens=True)
        tok.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
            "{% endif %}{% endif %}")
        te = seeded(0, Qwen3ForCausalLM, Qwen3Config(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True))
        vae = seeded(1, D.AutoencoderKLFlux2, **vae_kw)
        vae.bn.running_mean.copy_(0.3 * torch.randn(16))  # non-trivial stats, so a wrong
        vae.bn.running_var.copy_(0.5 + torch.rand(16))     # de-normalisation shows in tests
        for sub, seed, distilled in (("base", 2, False), ("distilled", 3, True)):
            tr = seeded(seed, D.Flux2Transformer2DModel, patch_size=1, in_channels=16, num_layers=1,
                        num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                        timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                        guidance_embeds=False)
            sch = D.FlowMatchEulerDiscreteScheduler(**sched, use_dynamic_shifting=True, time_shift_type="exponential")
            D.Flux2KleinPipeline(scheduler=sch, vae=vae, text_encoder=te, tokenizer=tok, transformer=tr,
                                 is_distilled=distilled).save_pretrained(os.path.join(tmp, sub))
    else:
        raise ValueError(name)
    try:
        os.replace(tmp, folder)  # atomic: two ranks building at once cannot half-write it
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def load_diffusers(name, pretrained=None, generator_pretrained=None, resolution=None, device="cpu",
                   dtype=torch.float32, cache_dir=None, text_layers=None, guidance=None, **kw):
    """Load a real backbone, or a tiny twin (built into cache_dir if missing), from_pretrained."""
    import diffusers as D
    family, default, default_gen, g, res = SPECS[name]
    if name.startswith("tiny-"):
        folder = os.path.join(cache_dir or os.path.expanduser(os.path.join("~", ".cache", "rtdmd")), name)
        if not os.path.isdir(folder):
            with torch.random.fork_rng():  # the builder's seeds must not reset the caller's RNG
                build_tiny(name, folder)
        if family == "flux2":
            default, default_gen = os.path.join(folder, "base"), os.path.join(folder, "distilled")
            text_layers = text_layers or (1, 2, 3)  # the tiny Qwen3 has 3 layers
        else:
            default = folder
    if name == "mini-sd3":  # section 7; a missing folder names the command that builds it
        default = mini_folder(pretrained)
    pretrained = pretrained or default
    common = dict(guidance=guidance or g, resolution=resolution or res, device=device, dtype=dtype, **kw)
    if family == "sd3":
        pipe = load_pipeline(D.StableDiffusion3Pipeline, pretrained, dtype=dtype)
        return SD3Backbone(name, pipe, **common)
    pipe = load_pipeline(D.Flux2KleinPipeline, pretrained, dtype=dtype)
    gen_path = generator_pretrained or default_gen  # a pipeline, or a bare transformer folder
    sub = None if os.path.isfile(os.path.join(str(gen_path), "config.json")) else "transformer"
    gen = load_pipeline(D.Flux2Transformer2DModel, gen_path, "--generator-pretrained", subfolder=sub, dtype=dtype)
    return Flux2Backbone(name, pipe, generator_base=gen, text_layers=text_layers or (9, 18, 27), **common)

# --- 4. LoRA, hand-written (no peft at run time) ---------------------------------------------

LORA_TARGETS = {  # module-name suffixes, matched as peft matches them ("." boundary)
    # SD3.x: every block's joint-attention projections; "attn." keeps SD3.5's second self-attention (attn2,
    # MMDiT-X) out, as configs/cold_start/sd35m.yaml's target list does.
    "sd3": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
            "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    # FLUX.2: the double-stream projections, the single-stream fused qkv+mlp projection, and the single-stream
    # output projection of blocks 0-19 only, in both stages, for generator and fake score alike
    # (configs/cold_start/flux2_4b.yaml, configs/rtdmd/flux2_4b.yaml).
    "flux2": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
              "to_add_out", "to_qkv_mlp_proj")
             + tuple(f"single_transformer_blocks.{i}.attn.to_out" for i in range(20)),
}


class LoRALinear(nn.Linear):
    """A Linear with a LoRA branch that *shares* the wrapped layer's weight and bias (same state-dict names) and adds
    `lora_A.weight`, `lora_B.weight` (peft's names minus its adapter name). A, B are `dtype`: float32, or bf16 as
    the official code's (diffusers' add_adapter makes them in the base layer's dtype); the branch is cast back."""

    def __init__(self, base, rank, alpha, init="gaussian", dtype=torch.float32):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale = alpha / rank
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        with torch.no_grad():  # drawn in float32, then rounded: the same draw for either dtype
            self.lora_A.weight.normal_(0.0, 1.0 / rank if init == "gaussian" else 1.0)
            self.lora_B.weight.zero_()
        self.lora_A.to(dtype), self.lora_B.to(dtype)

    def forward(self, x):
        y = nn.functional.linear(x, self.weight, self.bias)
        lora = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale
        return y + lora.to(y.dtype)

    def delta(self):
        """The merged update (alpha/r) B A, float32 [out, in]."""
        return self.scale * self.lora_B.weight.float() @ self.lora_A.weight.float()


def lora_targets(net, family):
    """Names of the Linears of `net` that get a LoRA (section 4), the same in both stages."""
    suffixes = LORA_TARGETS[family]
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear)
            and any(n == s or n.endswith("." + s) for s in suffixes)]


def inject_lora(net, names, rank=32, alpha=64, init="gaussian", dtype=torch.float32):
    """Wrap the named Linears with LoRALinear; freeze everything else. Returns net."""
    net.requires_grad_(False)
    for n in names:
        parent, _, child = n.rpartition(".")
        owner = net.get_submodule(parent)
        setattr(owner, child, LoRALinear(owner.get_submodule(child), rank, alpha, init, dtype))
    return net


def lora_layers(net):
    return {n: m for n, m in net.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(net):
    """{module.lora_A.weight / .lora_B.weight: tensor} for checkpoints and EMA."""
    return {k: v for k, v in net.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def lora_modules(sd):
    """(sorted module names, rank) of a LoRA state dict {module.lora_A.weight: A, ...}."""
    names = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    return names, next(v for k, v in sd.items() if k.endswith("lora_A.weight")).shape[0]


def merge_lora(net, in_place=False):
    """Fold every LoRA into its base weight, W <- W + (alpha/r) B A, and put a plain nn.Linear back. The merged
    weight is a *new* tensor, so a teacher sharing W stays untouched; in_place writes the same numbers into W itself
    (for a base nothing else reads: no second copy)."""
    for n, m in lora_layers(net).items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                        device="meta", dtype=m.weight.dtype)
        merged = (m.weight.float() + m.delta()).to(m.weight.dtype)
        if in_place:
            with torch.no_grad():
                lin.weight = m.weight.copy_(merged)
        else:
            lin.weight = nn.Parameter(merged, requires_grad=m.weight.requires_grad)
        lin.bias = m.bias
        parent, _, child = n.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, lin)
    return net


def save_lora(lora, path, alpha=None):
    """Write a LoRA (a net with LoRALinears, or a lora_state_dict such as an EMA copy) in the file layout of
    section 4. alpha: the net's, else 2 r."""
    from safetensors.torch import save_file
    if isinstance(lora, nn.Module):
        m0 = next(iter(lora_layers(lora).values()))
        alpha = alpha or m0.scale * m0.lora_A.out_features
        lora = lora_state_dict(lora)
    names, r = lora_modules(lora)
    sd = {f"transformer.{k}": v.detach().cpu().contiguous() for k, v in lora.items()}
    config = {"transformer.r": r, "transformer.lora_alpha": alpha or 2 * r, "transformer.target_modules": names}
    save_file(sd, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})


# Wrapper prefixes a saved state dict may carry (DDP, torch.compile, FSDP, peft, diffusers); the official loader
# strips the first, second and fourth (rtdmd/inference.py, _strip_wrapper_prefixes).
LORA_WRAPPERS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "base_model.model.", "transformer.")
LORA_KEY = re.compile(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")  # optional peft adapter name


def read_lora(src):
    """A LoRA in any layout of the official loader (rtdmd/inference.py, _merge_lora_into_base_transformer) or of
    save_lora -> ({module.lora_A.weight: A, module.lora_B.weight: B}, alpha for that state dict's rank). src: a
    state dict, a peft folder (adapter_config.json + adapter_model.safetensors / .bin, or such a folder in
    transformer/), a save_lora .safetensors (alpha in its metadata) or a flat .pt / .pth (the released
    generator_ema.pt files), read with weights_only=True. Without a config the scale is the official fallback
    alpha / rank = 64 / 32, whatever the tensors' rank."""
    scale, sd = 64 / 32, src
    if isinstance(src, (str, os.PathLike)):
        path = str(src)
        sub = os.path.join(path, "transformer")  # a pipeline folder holding a peft folder
        if not os.path.isfile(os.path.join(path, "adapter_config.json")) and os.path.isdir(sub):
            path = sub
        if os.path.isfile(cfg_file := os.path.join(path, "adapter_config.json")):  # a peft folder
            with open(cfg_file) as f:
                cfg = json.load(f)
            scale = float(cfg.get("lora_alpha", 64)) / float(cfg.get("r", 32))
        if os.path.isdir(path):
            path = next((f for e in (".safetensors", ".bin", ".pt")
                         if os.path.isfile(f := os.path.join(path, "adapter_model" + e))), path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--lora {src}: no such file (a .pt / .safetensors LoRA, or a peft folder with "
                                    "adapter_model.safetensors / .bin / .pt)")
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
                sd = {k: f.get_tensor(k) for k in f.keys()}
            if (r_key := next((k for k in meta if k.endswith(".r") or k == "r"), None)) is not None:
                scale = float(meta[r_key[:-1] + "lora_alpha"]) / float(meta[r_key])
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"--lora {src}: not a tensor-only checkpoint ({type(e).__name__}); only state "
                                 "dicts of tensors are read (weights_only=True)") from None
    out = {}
    for k, v in sd.items():
        while (p := next((w for w in LORA_WRAPPERS if k.startswith(w)), None)):
            k = k[len(p):]
        if (m := LORA_KEY.match(k)) and torch.is_tensor(v):
            out[f"{m.group(1)}.lora_{m.group(2)}.weight"] = v
    if not out:
        what = "state dict" if isinstance(src, dict) else src
        raise ValueError(f"--lora {what}: no '...lora_A[.adapter].weight' / '...lora_B...' keys found")
    return out, scale * lora_modules(out)[1]


def load_lora(net, lora):
    """Wrap the modules named in `lora` (anything read_lora reads) with LoRALinear, load it."""
    sd, alpha = read_lora(lora)
    names, r = lora_modules(sd)
    if unknown := [n for n in names if n not in dict(net.named_modules())]:
        raise ValueError(f"LoRA names modules this backbone does not have, e.g. {unknown[0]!r}: is it a LoRA of "
                         "another model?")
    trainable = [p for p in net.parameters() if p.requires_grad]  # full fine-tune stays trainable
    inject_lora(net, names, r, alpha)
    for p in trainable:
        p.requires_grad_(True)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k], (missing, unexpected)
    return net


def merged_generator(bb, loras):
    """The generator base with each LoRA of `loras` merged into its weights, in order (official code:
    rtdmd/inference.py, lora_paths [distilled, rl]): a released RTDMD model is its stage-1 LoRA, then its stage-2
    LoRA. The base's own tensors stay untouched (merge_lora)."""
    net = shared_copy(bb.generator_base)
    for lora in loras:
        merge_lora(load_lora(net, lora))
    return net.eval().requires_grad_(False)


def stack_loras(loras):
    """One LoRA whose delta is the sum of the deltas of `loras`: A = [A1; A2; ...] stacked on the rank axis,
    B = [B1 c1, B2 c2, ...] with c_i = s_i / s (s_i = alpha_i / r_i, s the stack's scale, that of the first), so
    s B A = sum_i s_i B_i A_i exactly. A module missing from one LoRA gets zero rows there, so every module has the
    summed rank: two rank-32 LoRAs become one rank-64 LoRA that stock pipelines load. Returns (state dict, alpha)."""
    read = [read_lora(x) for x in loras]
    ranks = [lora_modules(sd)[1] for sd, _ in read]
    scales = [a / r for (_, a), r in zip(read, ranks)]
    out = {}
    for n in sorted({m for sd, _ in read for m in lora_modules(sd)[0]}):
        ref = next(sd for sd, _ in read if n + ".lora_A.weight" in sd)
        d_in, d_out = ref[n + ".lora_A.weight"].shape[1], ref[n + ".lora_B.weight"].shape[0]
        A = [sd.get(n + ".lora_A.weight", torch.zeros(r, d_in)).float() for (sd, _), r in zip(read, ranks)]
        B = [sd.get(n + ".lora_B.weight", torch.zeros(d_out, r)).float() * (s / scales[0])
             for (sd, _), r, s in zip(read, ranks, scales)]
        out[n + ".lora_A.weight"], out[n + ".lora_B.weight"] = torch.cat(A), torch.cat(B, 1)
    return out, scales[0] * sum(ranks)


def export_stacked_lora(loras, path):
    """stack_loras written by save_lora: a diffusers/peft file for `pipe.load_lora_weights`."""
    sd, alpha = stack_loras(loras)
    save_lora(sd, path, alpha=int(alpha) if float(alpha).is_integer() else alpha)
    return path


def export_merged(net, folder):
    """Save `net` with its LoRA merged as a plain transformer folder (save_pretrained) that a stock pipeline loads
    with no extra library: Pipeline.from_pretrained(base, transformer=<TransformerClass>.from_pretrained(folder))"""
    merge_lora(shared_copy(net)).save_pretrained(folder)
# --- 5. load(name) ---------------------------------------------------------------------------

BACKBONES = ("toy", "toy-gauss") + tuple(SPECS)


def load(name, **kw):
    """Return the backbone called `name` (see the interface in the module docstring)."""
    if name == "toy":
        return ToyBackbone(**kw)
    if name == "toy-gauss":
        return ToyGaussBackbone(**kw)
    if name in SPECS:  # kw: pretrained, generator_pretrained, resolution, device, dtype,
        return load_diffusers(name, **kw)  # cache_dir, gradient_checkpointing, lora_rank, ...
    raise ValueError(f"unknown --model {name!r}; choose one of: {', '.join(BACKBONES)}")


def read_run_config(run_dir, required=True):
    """RUN/config.json, the run's train.py arguments (train.py, eval.py and load_run read it here). A missing file
    raises a one-line FileNotFoundError, or gives None when not required."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        if not required:
            return None
        raise FileNotFoundError(f"{path} not found: is {run_dir!r} a run folder written by train.py?")
    with open(path) as f:
        return json.load(f)


def load_run(run_dir, stage=None, which="ema", **kw):
    """(backbone, trained generator, stage) of a run folder written by train.py; stage None = the latest present;
    which: "ema" (what stage 2 and inference use) or "generator" (raw weights); kw override load()'s arguments.
    The backbone is rebuilt from config.json (a tiny twin is built in the run folder). The checkpoints hold only
    the trainable tensors, under the student's names:
    stage1.pt  ck["generator"], ck["ema"]: the generator's LoRA (all its weights for the toy and lora_rank 0);
               net = make_student("generator") + ck[which].
    stage2.pt  the *stage-2* LoRA under the same keys, and on a LoRA backbone ck["stage1_ema"], the stage-1 EMA
               LoRA the stage-2 student merged into its base (sections 3, 4):
               net = make_student("generator", stage=2, merge=ck["stage1_ema"]) + ck[which]."""
    cfg = read_run_config(run_dir)
    stages = [k for k in (2, 1) if os.path.exists(os.path.join(run_dir, f"stage{k}.pt"))]
    if stage is None:
        if not stages:
            raise FileNotFoundError(f"no stage1.pt / stage2.pt in {run_dir}; train first")
        stage = stages[0]
    ck = load_checkpoint(os.path.join(run_dir, f"stage{stage}.pt"))
    rank = cfg.get("lora_rank", 32)
    args = dict(cache_dir=run_dir, lora_rank=rank, lora_alpha=2 * rank, width=cfg.get("toy_width", 128),
                **{k: cfg.get(k) for k in ("pretrained", "generator_pretrained", "resolution")},
                angles=cfg.get("toy_angles", 0), exact_prefix=cfg.get("toy_exact_prefix", False),
                per_step=cfg.get("toy_per_step", False))
    bb = load(cfg["model"], **(args | kw))
    merged = dict(stage=2, merge=ck["stage1_ema"]) if stage == 2 and "stage1_ema" in ck else {}
    net = bb.make_student("generator", **merged)
    missing, unexpected = net.load_state_dict(ck[which], strict=False)
    lost = [k for k in missing if ".lora_" in k]  # a LoRA the checkpoint should have held
    assert not unexpected and not lost, f"{run_dir} stage {stage}: {unexpected[:3]} {lost[:3]}"
    return bb, net.eval().requires_grad_(False), stage

# --- 6. Run-folder checkpoints and prompt files ----------------------------------------------


def load_checkpoint(path):
    """torch.load(path) that never executes code from the file (a run folder may come from someone else):
    weights_only reads tensors, dicts, lists, str, int, float, bool, None, all that train.py writes (RNG states
    are uint8 tensors); anything else is refused with one ValueError line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))  # torch names the culprit
        what = f"a reference to {found.group(1)}" if found else "Python objects beyond tensors"
        raise ValueError(f"refusing to load {path}: it holds {what}, which could run code when unpickled; it was "
                         "not written by train.py (or was changed since); only open run folders you trust") from None


def read_prompt_file(path):
    """(prompts: list[str], metadata: list[dict]) of a prompt file (official code: rtdmd/data/prompt_dataset.py):
    .txt, one prompt a line (the PickScore, DrawBench, HPSv3 and OCR sets; metadata {}); .jsonl, one JSON object a
    line with a "prompt" field, its other fields that prompt's metadata (GenEval's train/test_metadata.jsonl: tag,
    include, ...), which a reward gets as reward(images, prompts, metadata). Blank lines are skipped; bad files
    raise one line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} not found: pass a .txt (one prompt a line) or a .jsonl "
                                "(a \"prompt\" field a line)")
    if path.endswith(".json"):
        raise ValueError(f"{path}: a .json prompt file is not read; use .txt (one prompt a line) or .jsonl (one "
                         "JSON object with a \"prompt\" field a line)")
    with open(path, encoding="utf-8") as f:
        lines = [(i + 1, line.strip()) for i, line in enumerate(f) if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {path} holds no prompts (it is empty or blank)")
    if not path.endswith(".jsonl"):
        return [line for _, line in lines], [{} for _ in lines]
    prompts, metadata = [], []
    for n, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ValueError(f"{path} line {n} has no \"prompt\" field (a string); every .jsonl line must be an "
                             "object like {\"prompt\": \"a photo of a cat\", ...}")
        prompts.append(rec.pop("prompt"))
        metadata.append(rec)
    return prompts, metadata


def file_sha256(path):
    """Hex sha256 of a file's bytes: which prompt file a run or an evaluation used."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

# --- 7. mini-sd3: the real SD3 classes, tiny, pretrained on drawn shapes ---------------------
# A middle world between the toy and SD3: a StableDiffusion3Pipeline of stock diffusers classes,
# small enough to pretrain on a laptop CPU (`python models.py --pretrain mini-sd3`), on 32-px
# pictures of coloured shapes drawn with Pillow, so that a detector can tell whether a picture
# shows its prompt (rewards.py, section 4). Stage 1, stage 2, sample.py and eval.py then run on
# it through SD3Backbone, the very code path of SD3-M. The parts, each the smallest that works:
#   VAE          AutoencoderKL (16, 32, 64), 4x down, 8 latent channels, no mid attention
#   text         frozen *random* CLIP-L / CLIP-G / T5 twins: the transformer learns to read their
#                features, which only need to tell the ~105 prompts apart; word-level tokenizers
#                of 8 tokens (6 words at most, plus CLIP's start / end or T5's end), so no prompt is
#                truncated and text is 8 + 8 of the 24 tokens the transformer attends over
#                (the stock pipeline needs max_sequence_length=8)
#   transformer  SD3Transformer2DModel, 4 layers, hidden 128, patch 2, rectified flow
MINI_SHAPES = ("circle", "square", "triangle")
MINI_COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
                "yellow": (240, 200, 20), "purple": (140, 40, 180)}
MINI_BACKGROUND = (255, 255, 255)  # plain white: every non-white pixel belongs to a shape
MINI_COUNTS = ("a", "two", "three")
# position -> (axis, low, high): the shape's box lies inside [low, high) of that axis in pixels
# of a 32-px image; the detector's rule (its centre in the outer 40%) holds for every such box
MINI_POSITIONS = {"on the left": (0, 1, 14), "on the right": (0, 18, 31),
                  "at the top": (1, 1, 14), "at the bottom": (1, 18, 31)}
MINI_SIZE, MINI_DEFAULT = 32, os.path.join(os.path.expanduser("~"), ".cache", "rtdmd", "mini-sd3")


def mini_prompt(n, colour, shape, position=None):
    """(1, "red", "circle", None) -> "a red circle"; (2, "blue", "square") -> "two blue squares"."""
    text = f"{MINI_COUNTS[n - 1]} {colour} {shape}{'s' if n > 1 else ''}"
    return text + (f" {position}" if position else "")


MINI_PROMPTS = [mini_prompt(n, c, s) for n in (1, 2, 3) for c in MINI_COLOURS for s in MINI_SHAPES] + \
    [mini_prompt(1, c, s, p) for p in MINI_POSITIONS for c in MINI_COLOURS for s in MINI_SHAPES]  # 45 + 60
MINI_GRAMMAR = re.compile(rf"^({'|'.join(MINI_COUNTS)}) ({'|'.join(MINI_COLOURS)}) ({'|'.join(MINI_SHAPES)})s?"
                          rf"(?: ({'|'.join(MINI_POSITIONS)}))?$")


def parse_mini_prompt(prompt):
    """"two blue squares" -> (2, "blue", "square", None); None for a prompt outside the grammar."""
    m = MINI_GRAMMAR.match(prompt.strip().lower())
    return m and (MINI_COUNTS.index(m.group(1)) + 1, m.group(2), m.group(3), m.group(4))


def draw_mini(prompt, rng, size=MINI_SIZE):
    """The picture of a prompt (a PIL image): its shapes, 8-11 px each, at random places at least
    2 px apart (so no two touch, and the detector's connected components are the shapes), without
    anti-aliasing (so a clean drawing holds palette colours only). "" draws the empty background:
    blank pictures are in the VAE's data, and CFG's null branch learns the unconditional mix."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), MINI_BACKGROUND)
    spec = parse_mini_prompt(prompt) if prompt else None
    if spec is None:
        return img
    n, colour, shape, pos = spec
    draw, boxes = ImageDraw.Draw(img), []
    while len(boxes) < n:  # rejection sampling: 3 boxes of <= 11 px always fit
        s = rng.randint(8, 11)
        lo = [1, 1]
        hi = [size - 1, size - 1]
        if pos:
            axis, a, b = MINI_POSITIONS[pos]
            lo[axis], hi[axis] = a * size // 32, b * size // 32
        x, y = rng.randint(lo[0], hi[0] - s), rng.randint(lo[1], hi[1] - s)
        if all(x + s + 2 <= X or X + S + 2 <= x or y + s + 2 <= Y or Y + S + 2 <= y for X, Y, S in boxes):
            boxes.append((x, y, s))
    for x, y, s in boxes:
        e, fill = s - 1, MINI_COLOURS[colour]
        if shape == "square":
            draw.rectangle([x, y, x + e, y + e], fill=fill)
        elif shape == "circle":
            draw.ellipse([x, y, x + e, y + e], fill=fill)
        else:  # apex up
            draw.polygon([(x + e / 2, y), (x, y + e), (x + e, y + e)], fill=fill)
    return img


def mini_batch(prompts, rng):
    """Pictures of `prompts` as a float tensor [B, 3, H, W] in [-1, 1] (the VAE's range)."""
    import numpy as np
    arr = np.stack([np.asarray(draw_mini(p, rng)) for p in prompts])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def word_merges(words):
    """BPE merges learned the standard way (merge the most frequent adjacent pair, repeat) until
    every word of `words` is one token. Encoding a learned word with them in rank order retraces
    the learning, so CLIP's BPE tokenizer becomes word-level on this vocabulary; any other word
    still falls apart into letters."""
    seqs, merges = [list(w[:-1]) + [w[-1] + "</w>"] for w in words], []
    while any(len(s) > 1 for s in seqs):
        pairs = {}
        for s in seqs:
            for p in zip(s, s[1:]):
                pairs[p] = pairs.get(p, 0) + 1
        best = max(pairs, key=pairs.get)  # ties: the first pair seen (deterministic)
        merges.append(best)
        for k, s in enumerate(seqs):
            out = []
            for t in s:
                if out and (out[-1], t) == best:  # left to right, as BPE merges
                    out[-1] = out[-1] + t
                else:
                    out.append(t)
            seqs[k] = out
    return merges


def mini_parts(seed=0):
    """Every component of the mini StableDiffusion3Pipeline, untrained (random, fixed seeds).
    Widths: the two CLIPs' 64 + 64 features are padded to T5's 128 (the pipeline's rule), which
    is the transformer's joint_attention_dim; their pooled 64 + 64 = pooled_projection_dim."""
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel, T5Tokenizer)
    import diffusers as D
    words = sorted({w for p in MINI_PROMPTS for w in p.split()})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merges = word_merges(words)
    vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    vocab += list(dict.fromkeys(a + b for a, b in merges))  # every merge's product is a token
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=8)
    # T5 (sentencepiece unigram): a whole word scores 0, a letter -4, so the best split of a known
    # word is the word itself
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + \
        [("\u2581" + w, 0.0) for w in words] + [(c, -4.0) for c in letters]
    tok3 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=8)
    clip = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=8, projection_dim=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    te3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae = D.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                          up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                          layers_per_block=1, latent_channels=8, norm_num_groups=8, sample_size=MINI_SIZE,
                          mid_block_add_attention=False)
    tr = D.SD3Transformer2DModel(sample_size=MINI_SIZE // 4, patch_size=2, in_channels=8, out_channels=8, num_layers=4,
                                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                                 caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=MINI_SIZE // 4)
    return dict(transformer=tr, vae=vae, text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                text_encoder_3=te3, tokenizer_3=tok3, scheduler=D.FlowMatchEulerDiscreteScheduler(shift=3.0))


def cpu_clock(minutes):
    """Fraction of a budget of `minutes` on torch's threads used so far, from now, counted in
    *process CPU time* (minutes x threads of it): on idle cores that is wall time, and other jobs
    on the same cores change how long a pretraining takes, not how much it trains."""
    import time
    start, budget = time.process_time(), 60.0 * minutes * torch.get_num_threads()
    return lambda: (time.process_time() - start) / budget if budget > 0 else 1.0


def cosine_lr(opt, lr, frac):
    """Learning rate lr * (1 + cos(pi frac)) / 2, frac the share of the budget spent: a schedule
    that ends at 0 whatever the number of steps the budget buys."""
    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


# share of the budget on the VAE (--vae-share). The detector already reads ~29-dB reconstructions
# right, and the transformer's steps are what the teacher lacks: one pretraining each, seed 0, gave
# a 59.7% strict teacher at 0.3 (VAE 36.6 dB, flow loss 1.20) and 61.0% at 0.2 (34.0 dB, 1.00) on
# one machine, 67.0% at 0.2 (29.0 dB, 0.67) on a slower one, and 58.1% at 0.2 (27.5 dB, 0.62, 2,114
# transformer steps against 2,667) on a slower one still (README, "The mini-sd3 world").
MINI_VAE_SHARE = 0.2


def pretrain_mini(folder=MINI_DEFAULT, minutes=10.0, vae_share=MINI_VAE_SHARE, seed=0, batch=64, log=print):
    """Pretrain mini-sd3 for `minutes` on torch's threads (cpu_clock; vae_share on the VAE, the rest on the
    transformer) and save it with save_pretrained as a diffusers folder (plus prompts.txt, the
    training prompts, and pretrain.json, what was measured). Pictures are drawn on the fly, a
    fresh batch every step, 1 in 10 of the VAE's blank; the transformer sees 1 in 10 prompts as
    "" (CFG's null branch). Atomic, as build_tiny."""
    import random
    import diffusers as D
    rng = random.Random(seed)
    parts = mini_parts(seed)
    vae, tr = parts["vae"], parts["transformer"]
    pipe = D.StableDiffusion3Pipeline(**parts)
    # VAE: reconstruction MSE + a small KL that keeps the latents a smooth, bounded cloud
    # batch 8 at lr 2e-3: in a CPU budget, more small steps beat fewer large ones (25.9 dB after
    # 1.5 CPU minutes, against 18.8 dB at batch 32 and lr 1e-3)
    opt, clock, steps = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0), cpu_clock(minutes * vae_share), 0
    while clock() < 1:
        x = mini_batch([rng.choice(MINI_PROMPTS) if rng.random() > 0.1 else "" for _ in range(8)], rng)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = nn.functional.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        cosine_lr(opt, 2e-3, clock())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SD3's latent normalisation z' = (z - shift) * scaling, from the data
        x = mini_batch([rng.choice(MINI_PROMPTS + [""]) for _ in range(256)], rng)
        z = vae.encode(x).latent_dist.mean
        mse = nn.functional.mse_loss(vae.decode(z).sample.clamp(-1, 1), x).item()
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())
    report = dict(minutes=minutes, seed=seed, vae_steps=steps, vae_psnr_db=round(10 * math.log10(4 / mse), 2))
    log(f"mini-sd3 VAE: {steps} steps of batch 8, PSNR {report['vae_psnr_db']} dB")
    # transformer: rectified flow on the normalised latents, v = eps - x0
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompt=MINI_PROMPTS + [""], prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=8)
    opt, clock, steps, avg = torch.optim.AdamW(tr.parameters(), lr=2e-3, weight_decay=0.0), \
        cpu_clock(minutes * (1 - vae_share)), 0, None
    # a pool of encoded pictures (posterior mean and std), a quarter of a batch redrawn per step:
    # each picture serves ~4 times, and the VAE encoder costs a quarter of what it would
    def encode(n):
        idx = torch.tensor([rng.randrange(len(MINI_PROMPTS)) for _ in range(n)])
        with torch.no_grad():
            post = vae.encode(mini_batch([MINI_PROMPTS[i] for i in idx], rng)).latent_dist
        return idx, post.mean, post.std
    pool = [torch.cat(t) for t in zip(*[encode(batch) for _ in range(16)])]  # 16 batches
    while clock() < 1:
        new, slots = encode(batch // 4), torch.randint(0, len(pool[0]), (batch // 4,))
        for t, v in zip(pool, new):
            t[slots] = v
        pick = torch.randint(0, len(pool[0]), (batch,))
        idx, mean, std = (t[pick] for t in pool)
        text = torch.where(torch.rand(batch) < 0.1, len(MINI_PROMPTS), idx)  # the last row is ""
        x0 = (mean + std * torch.randn_like(std) - vae.config.shift_factor) * vae.config.scaling_factor
        # sigma logit-normal(0, 1), SD3's training density (Esser et al. 2024, arXiv 2403.03206, sec. 3.1):
        # strict accuracy of the 28-step teacher 55.6% against 37.1% for sigma ~ U(0, 1) and 45.7%
        # for U(0, 1) shifted by 3 (the sampler's shift), same 10 CPU minutes on one thread
        eps, sigma = torch.randn_like(x0), torch.sigmoid(torch.randn(batch))
        v = tr(hidden_states=add_noise(x0, eps, sigma), timestep=sigma_to_timestep(sigma),
               encoder_hidden_states=pe[text], pooled_projections=pooled[text], return_dict=False)[0]
        loss = nn.functional.mse_loss(v, velocity_target(x0, eps))
        cosine_lr(opt, 2e-3, clock())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        steps, avg = steps + 1, loss.item() if avg is None else 0.99 * avg + 0.01 * loss.item()
        if steps % 500 == 0:
            log(f"mini-sd3 transformer: step {steps}, loss {avg:.4f}, {100 * clock():.0f}% of its budget")
    report |= dict(transformer_steps=steps, transformer_loss=round(avg or float("nan"), 4), batch=batch)
    log(f"mini-sd3 transformer: {steps} steps of batch {batch}, flow loss {report['transformer_loss']}")
    tmp = f"{folder}.tmp{os.getpid()}"
    pipe.save_pretrained(tmp)
    with open(os.path.join(tmp, "prompts.txt"), "w") as f:
        f.write("\n".join(MINI_PROMPTS) + "\n")
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(report, f, indent=1)
    if os.path.isdir(folder):  # a rebuild replaces the old folder
        import shutil
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return report


def mini_folder(pretrained=None):
    """The mini-sd3 folder to load: --pretrained, else ~/.cache/rtdmd/mini-sd3; missing, it says
    which command builds it (one line, no traceback)."""
    folder = pretrained or MINI_DEFAULT
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise SystemExit(f"error: no mini-sd3 pipeline in {folder}: build it (10 minutes on 2 cores) with "
                         f"`python models.py --pretrain mini-sd3{'' if folder == MINI_DEFAULT else ' --out ' + folder}`")
    return folder


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Pretrain a backbone that is built here (section 7).")
    p.add_argument("--pretrain", required=True, choices=("mini-sd3",))
    p.add_argument("--out", default=MINI_DEFAULT, help=f"diffusers folder to write (default {MINI_DEFAULT})")
    p.add_argument("--minutes", type=float, default=10.0, help="on idle cores, wall time")
    p.add_argument("--vae-share", type=float, default=MINI_VAE_SHARE, help="share of the minutes spent on the VAE (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2: 1.46x the steps of 1 on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(json.dumps(pretrain_mini(a.out, a.minutes, a.vae_share, seed=a.seed, log=lambda s: print(s, flush=True))))


if __name__ == "__main__":
    main()
