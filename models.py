"""
models.py -- WHAT generates: flow-matching conventions, the backbones, LoRA.

Read this file first; every other file uses its conventions.

1. Flow-matching conventions (ALGORITHM.md section 1.1, SD3's rectified flow)
   ------------------------------------------------------------------------
   sigma in [0, 1] is the noise level, sigma = 1 is pure noise:

       x_sigma = (1 - sigma) * x0 + sigma * eps,       eps ~ N(0, I)

   A velocity network predicts v ~= E[eps - x0 | x_sigma]; the velocity points from data to
   noise. From a velocity we recover both ends of the straight line through x:

       x0_hat  = x - sigma * v
       eps_hat = x + (1 - sigma) * v          check: (1-sigma) x0_hat + sigma eps_hat = x

   The transformer's input is the *model timestep* tau = 1000 * sigma of an already shifted
   sigma. The "shift" of SD3 / FLUX is applied exactly once, when the raw step list
   [1000, 750, 500, 250] of the 4-step sampler is turned into sampler sigmas
   (`sd3_sigmas`, `flux2_sigmas`). Noise levels drawn *inside* the losses are never shifted.

2. The backbone interface (ARCHITECTURE.md section 3)
   --------------------------------------------------
   `load(name, ...)` returns a backbone object. The loss files (acdmd.py, subgrpo.py) and the
   samplers (sample.py) only ever talk to a backbone through these members, so they never know
   whether they run on the 2-D toy or on SD3:

       bb.name                  str
       bb.latent_shape          tuple, shape of one sample's latent, e.g. (2,) or (16, 64, 64)
       bb.sigmas                Tensor[5], the 4-step sampler sigmas with sigma_4 = 0 appended
       bb.guidance              float, the teacher's CFG scale g used in the DMD losses
       bb.teacher               frozen velocity nn.Module (eval mode, requires_grad False)
       bb.make_student(role)    trainable velocity nn.Module for role "generator" or "fake";
                                its initial function equals the base model's
       bb.encode(prompts)       list[str] -> cond, a dict of batch-first tensors;
                                the empty prompt "" encodes the unconditional branch of CFG
       bb.velocity(net, x, sigma, cond)
                                v = net's velocity at latents x [B, *latent_shape] and noise
                                levels sigma [B] (float, in [0, 1]); the backbone converts sigma to
                                its own model timestep
       bb.noise(n, generator)   Tensor[n, *latent_shape] of N(0, I) in float32
       bb.decode(x)             images [B, 3, H, W] in [0, 1], differentiable
       bb.prompts               list[str], the default training prompts

   plus `cfg_velocity` below for the classifier-free-guided teacher.
"""
import copy
import math
import os

import torch
import torch.nn as nn

# ---------------------------------------------------------------------------------------------
# 1. Flow-matching conventions
# ---------------------------------------------------------------------------------------------


def bcast(sigma, x):
    """Reshape a per-sample sigma [B] (or a float) so it broadcasts against x [B, ...]."""
    if not torch.is_tensor(sigma):
        return torch.tensor(float(sigma), dtype=x.dtype, device=x.device)
    return sigma.to(x.device).reshape(-1, *([1] * (x.dim() - 1)))


def add_noise(x0, eps, sigma):
    """Forward path x_sigma = (1 - sigma) x0 + sigma eps (ALGORITHM.md 1.1)."""
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
    """v = -(x + sigma^2 score)/(1 - sigma)... derived: E[x0|x] = (x + sigma^2 score)/(1 - sigma),
    v = (x - E[x0|x])/sigma = -(x + sigma * score)/(1 - sigma)  (ALGORITHM.md 1.1)."""
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
    u = torch.tensor(step_list, dtype=torch.float64) / 1000.0
    s = shift * u / (1 + (shift - 1) * u)
    s = torch.round(s * 1e6) / 1e6  # the official code rounds to 6 decimals
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def flux2_empirical_mu(image_seq_len, num_steps):
    """FLUX.2's resolution-dependent shift mu (ALGORITHM.md 1.2): piecewise linear in the token
    count, and linear in the number of steps between the (10 steps) and (200 steps) lines."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return a2 * image_seq_len + b2
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return a * num_steps + b


def flux2_sigmas(step_list=DENOISING_STEP_LIST, resolution=512):
    """FLUX.2-klein dynamic shift: sigma = e^mu / (e^mu + (1/u - 1)), image_seq_len = (res/16)^2.
    512 px -> [1, .95809, .88398, .71750, 0]; 1024 px -> [1, .96738, .90814, .76720, 0]."""
    seq = (resolution // 16) ** 2
    mu = flux2_empirical_mu(seq, len(step_list))
    u = torch.tensor(step_list, dtype=torch.float64) / 1000.0
    s = math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def cfg_velocity(bb, net, x, sigma, cond, null_cond, g):
    """Classifier-free guidance (ALGORITHM.md 1.4): v = v(null) + g (v(c) - v(null)).
    One batched forward over [null; cond]."""
    if g == 1.0:
        return bb.velocity(net, x, sigma, cond)
    both = {k: torch.cat([null_cond[k], cond[k]]) for k in cond}
    v = bb.velocity(net, torch.cat([x, x]), torch.cat([sigma, sigma]), both)
    v_null, v_cond = v.chunk(2)
    return v_null + g * (v_cond - v_null)


def cond_select(cond, idx):
    """Index every tensor of a condition dict along the batch dimension."""
    return {k: v[idx] for k, v in cond.items()}


# ---------------------------------------------------------------------------------------------
# 2. The toy backbone: a 2-D conditional Gaussian mixture (ALGORITHM.md section 9)
# ---------------------------------------------------------------------------------------------


class Mixture:
    """An isotropic Gaussian mixture in d dimensions with per-condition weights.

    means [J, d], stds [J], weights [C, J] (one row per condition; rows sum to 1).
    Everything about it is closed form at every noise level sigma (ALGORITHM.md 9.1):

        p_sigma(x | c) = sum_j pi_cj N(x; (1 - sigma) mu_j, V_j(sigma) I),
        V_j(sigma)     = (1 - sigma)^2 s_j^2 + sigma^2.
    """

    def __init__(self, means, stds, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)

    def sample(self, c, sigma=0.0, generator=None):
        """Exact samples of p_sigma(x | c) for a LongTensor of conditions c [B]."""
        j = torch.multinomial(self.weights[c], 1, generator=generator).squeeze(1)
        x0 = self.means[j] + self.stds[j, None] * torch.randn(
            len(c), self.means.shape[1], generator=generator, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        return ((1 - sigma) * x0 + sigma * eps).float()

    def _posterior(self, x, sigma, c):
        # log-weights of component j given x at level sigma: pi_cj N(x; (1-sigma) mu_j, V_j I)
        x = x.double()
        s = bcast(sigma, x).clamp(min=1e-4).double()  # [B, 1]
        V = (1 - s) ** 2 * self.stds[None] ** 2 + s ** 2  # [B, J]
        diff = x[:, None, :] - (1 - s)[:, :, None] * self.means[None]  # [B, J, d]
        d = x.shape[1]
        logw = (self.weights[c].clamp_min(1e-300).log()
                - 0.5 * (diff ** 2).sum(-1) / V - 0.5 * d * torch.log(2 * math.pi * V))
        return logw, V, diff, s

    def log_prob(self, x, sigma, c):
        """log p_sigma(x | c)."""
        logw, _, _, _ = self._posterior(x, sigma, c)
        return torch.logsumexp(logw, dim=1)

    def score(self, x, sigma, c):
        """grad_x log p_sigma(x | c) = sum_j w_j(x) * (-(x - (1 - sigma) mu_j) / V_j)."""
        logw, V, diff, _ = self._posterior(x, sigma, c)
        w = torch.softmax(logw, dim=1)
        return (w[:, :, None] * (-diff / V[:, :, None])).sum(1).to(x.dtype)

    def posterior_x0(self, x, sigma, c):
        """E[x0 | x_sigma] = sum_j w_j m_j with m_j = mu_j + (1-sigma) s_j^2 / V_j (x - (1-sigma) mu_j)."""
        logw, V, diff, s = self._posterior(x, sigma, c)
        w = torch.softmax(logw, dim=1)
        m = self.means[None] + ((1 - s) * self.stds[None] ** 2 / V)[:, :, None] * diff
        return (w[:, :, None] * m).sum(1).to(x.dtype), w, m, V

    def velocity(self, x, sigma, c):
        """Exact flow velocity v = (x - E[x0 | x]) / sigma (sigma clamped at 1e-4)."""
        x0, _, _, _ = self.posterior_x0(x, sigma, c)
        s = bcast(sigma, x).clamp(min=1e-4)
        return (x - x0) / s


def toy_mixture(num_components=8, radius=2.0, std=0.3):
    """The toy world of ALGORITHM.md 9.1: 8 components on a circle of radius 2, std 0.3, and
    four conditions. Prompt 'top' uses components 0-3 with *unequal* weights (so mode
    occupancy is a real test), 'bottom' uses 4-7 uniformly, 'ring' uses all 8, and the empty
    prompt "" (CFG's unconditional branch) uses the average of the three rows."""
    J = num_components
    ang = torch.arange(J, dtype=torch.float64) * 2 * math.pi / J
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    w = torch.zeros(3, J, dtype=torch.float64)
    w[0, :4] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    w[1, 4:] = 0.25
    w[2, :] = 1.0 / J
    weights = torch.cat([w, w.mean(0, keepdim=True)])
    return Mixture(means, torch.full((J,), std), weights)


TOY_PROMPTS = ("top", "bottom", "ring")


class ExactVelocity(nn.Module):
    """The toy teacher: the exact mixture velocity wrapped as a (parameter-free) module, so that
    it is called exactly like a network: net(x, sigma, c)."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, sigma, c):
        return self.mixture.velocity(x, sigma, c)


class ToyMLP(nn.Module):
    """Velocity MLP f(x, sigma, c): input [x, Fourier(sigma), one-hot(c)] -> 3 x width SiLU -> d."""

    def __init__(self, dim=2, num_cond=4, width=128, depth=3):
        super().__init__()
        self.num_cond = num_cond
        self.register_buffer("freqs", torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi)
        layers, w_in = [], dim + 8 + 1 + num_cond
        for _ in range(depth):
            layers += [nn.Linear(w_in, width), nn.SiLU()]
            w_in = width
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x, sigma, c):
        s = sigma.reshape(-1, 1).to(x.dtype)
        feats = [x, s, torch.sin(s * self.freqs), torch.cos(s * self.freqs),
                 nn.functional.one_hot(c, self.num_cond).to(x.dtype)]
        return self.net(torch.cat(feats, 1))


def pretrain_toy_base(mixture, steps=2000, batch=512, lr=1e-3, width=128, seed=0, progress=False):
    """The toy's "pretrained base model": plain flow matching (minRF-style) on exact samples.
    It initialises the generator and the fake score, exactly as the real generator and fake
    score start from the teacher's weights (ALGORITHM.md 4.1)."""
    g = torch.Generator().manual_seed(seed)
    net = ToyMLP(num_cond=mixture.weights.shape[0], width=width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    C = mixture.weights.shape[0]
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="pretrain toy base")
    for _ in it:
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
    """The toy world behind the backbone interface. The teacher is the *exact* mixture
    velocity; generator and fake score start from a small MLP pretrained by flow matching,
    cached as `toy_base.pt` in `cache_dir` so a second run skips the pretraining."""

    name = "toy"
    latent_shape = (2,)

    def __init__(self, cache_dir=None, guidance=1.0, shift=3.0, width=128, pretrain_steps=2000,
                 mixture=None, device="cpu", progress=False, **unused):
        self.mixture = mixture if mixture is not None else toy_mixture()
        self.prompts = list(TOY_PROMPTS)
        self.guidance = guidance  # g = 1: the CFG teacher *is* p(x|c), so targets stay exact
        self.sigmas = sd3_sigmas(shift=shift)
        self.device = torch.device(device)
        self.teacher = ExactVelocity(self.mixture).eval().requires_grad_(False)
        path = None if cache_dir is None else os.path.join(cache_dir, f"toy_base_w{width}.pt")
        if path is not None and os.path.exists(path):
            ck = torch.load(path, map_location="cpu")
            self.base = ToyMLP(num_cond=self.mixture.weights.shape[0], width=ck["width"])
            self.base.load_state_dict(ck["state_dict"])
        else:
            self.base = pretrain_toy_base(self.mixture, steps=pretrain_steps, width=width,
                                          progress=progress)
            if path is not None:
                os.makedirs(cache_dir, exist_ok=True)
                torch.save({"width": width, "state_dict": self.base.state_dict()}, path + ".tmp")
                os.replace(path + ".tmp", path)
        self.base.eval().requires_grad_(False)

    def make_student(self, role):
        net = copy.deepcopy(self.base).to(self.device).train()
        return net.requires_grad_(True)

    def encode(self, prompts):
        """Prompt strings -> condition index; "" is the unconditional (CFG null) branch."""
        names = self.prompts + [""]
        try:
            c = [names.index(p) for p in prompts]
        except ValueError:
            raise ValueError(f"unknown toy prompt in {prompts!r}; the toy knows {self.prompts} "
                             "and '' (unconditional)") from None
        return {"c": torch.tensor(c, dtype=torch.long, device=self.device)}

    def velocity(self, net, x, sigma, cond):
        return net(x, sigma.to(x.dtype), cond["c"])

    def noise(self, n, generator=None):
        return torch.randn(n, *self.latent_shape, generator=generator).to(self.device)

    def decode(self, x):
        """The toy has no VAE: a 'sample' is the 2-D point itself (rewards score the point)."""
        return x

class ShiftVelocity(nn.Module):
    """The "toy-gauss" generator: the exact teacher velocity plus one learnable vector b,
        G(x, sigma, c) = v_teacher(x, sigma, c) + b.
    It can only move its output mean (linearly in b), which makes the stationary point of the
    stage-2 exact-decomposition mode closed-form (ALGORITHM.md 9.6; derived in eval.py)."""

    def __init__(self, mixture, dim=2):
        super().__init__()
        self.teacher = ExactVelocity(mixture)
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x, sigma, c):
        return self.teacher(x, sigma, c).to(x.dtype) + self.b


def toy_gauss(mean=(0.5, -0.5), std=0.5):
    """A single isotropic Gaussian N(mean, std^2 I), with the toy's four conditions all equal."""
    return Mixture(torch.tensor([mean], dtype=torch.float64), torch.tensor([std]),
                   torch.ones(len(TOY_PROMPTS) + 1, 1, dtype=torch.float64))


class ToyGaussBackbone(ToyBackbone):
    """"toy-gauss": the toy backbone with a single-Gaussian teacher and a shift-only generator
    (ShiftVelocity). The fake score is still the flow-matched MLP. Used by the exact-decomposition
    check of stage 2 (ALGORITHM.md 9.6, 2.)."""

    name = "toy-gauss"

    def __init__(self, **kw):
        super().__init__(mixture=toy_gauss(), **kw)
        self.prompts = ["gauss"]  # one prompt: a GRPO group is then every sample of the epoch

    def make_student(self, role):
        if role == "generator":
            return ShiftVelocity(self.mixture).to(self.device).train()
        return super().make_student(role)

# ---------------------------------------------------------------------------------------------
# 3. Real backbones: SD3-M, SD3.5-M, FLUX.2-klein-4B, and their tiny offline twins
# ---------------------------------------------------------------------------------------------

# (real backbones go here)

# ---------------------------------------------------------------------------------------------
# 4. LoRA, hand-written (no peft at run time)
# ---------------------------------------------------------------------------------------------

# (LoRA goes here)

# ---------------------------------------------------------------------------------------------
# 5. load(name)
# ---------------------------------------------------------------------------------------------

BACKBONES = ("toy", "toy-gauss")


def load(name, **kw):
    """Return the backbone called `name` (see the interface in the module docstring)."""
    if name == "toy":
        return ToyBackbone(**kw)
    if name == "toy-gauss":
        return ToyGaussBackbone(**kw)
    raise ValueError(f"unknown --model {name!r}; choose one of: {', '.join(BACKBONES)}")


def load_run(run_dir, stage=None, which="ema"):
    """Backbone and trained generator of a run folder written by train.py.
    stage None = the latest stage present. which: "ema" (what stage 2 and inference use) or
    "generator" (the raw weights). Returns (backbone, net, stage)."""
    import json
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir!r} a run folder written by train.py?")
    with open(cfg_path) as f:
        cfg = json.load(f)
    stages = [k for k in (2, 1) if os.path.exists(os.path.join(run_dir, f"stage{k}.pt"))]
    if stage is None:
        if not stages:
            raise FileNotFoundError(f"no stage1.pt / stage2.pt in {run_dir}; train first")
        stage = stages[0]
    ck = torch.load(os.path.join(run_dir, f"stage{stage}.pt"), map_location="cpu", weights_only=False)
    bb = load(cfg["model"], cache_dir=run_dir, pretrained=cfg.get("pretrained"), width=cfg.get("toy_width", 128))
    net = bb.make_student("generator")
    net.load_state_dict(ck[which], strict=False)
    return bb, net.eval().requires_grad_(False), stage
