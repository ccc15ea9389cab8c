"""
sample.py -- HOW samples are drawn: every sampler of the project lives here.

    cps_step            one coefficient-preserving sampling (CPS) step              (section 1)
    euler_sample        the teacher's Euler ODE with classifier-free guidance       (section 2)
    rollout             the 4-step generator sampler (CPS, eta = 0.9)                (section 2)
    random_stop         the stop index of a stage-1 backward simulation             (section 3)
    backward_simulation stage-1's random-stop simulation, grad on the last step only (section 3)

The losses (acdmd.py, subgrpo.py) call these instead of re-implementing steps. "Official code" is
github.com/Harahan/RTDMD (README).

1. The CPS step (paper App. C; official code: rtdmd/schedulers/cps_scheduler.py)
   From x at level sigma with velocity v, to sigma' < sigma, with theta = eta pi / 2:
       x0_hat = x - sigma v,  eps_hat = x + (1 - sigma) v            (models.py, section 1)
       x'     = (1 - sigma') x0_hat + sigma' (cos(theta) eps_hat + sin(theta) z),  z ~ N(0, I).
   cos^2 + sin^2 = 1, so the noise at sigma' keeps total std sigma' ("coefficient preserving"): for a known x0
   the kernel maps the marginal at sigma onto the marginal at sigma' for every eta (tests/test_sample.py). It is
   the DDIM(eta) kernel with x0 and eps replaced by their estimates, not the true reverse kernel of the flow.
   eta = 0 or sigma' = 0 gives Euler. The official configs use eta = 0.9 everywhere, so fresh noise is 98.8% of
   the next level's std. All arithmetic is float32; the output is cast back to x's dtype.

2. The teacher ODE and the few-step rollout (paper App. K)
   The teacher integrates dx = v dsigma with Euler steps and classifier-free guidance v = v(null) + g (v(c) -
   v(null)) (models.cfg_velocity). The generator samples 4 steps on the shifted sigmas of [1000, 750, 500, 250]
   (models.py, section 1) with CPS eta 0.9 and no CFG; its last step goes to sigma' = 0, so it returns x0_hat of
   that step (official code: rtdmd/inference.py).

3. Backward simulation with random stop (stage 1; official code: rtdmd/trainers/dmd_trainer.py, `_generate_latents`)
   Draw stop ~ U{1, ..., 4} (`random_stop`), the same on every rank. Run steps 0 .. stop-2 of the rollout without
   grad, and step k = stop - 1 with grad. The output x_s of step k is what the AC-DMD losses compare with the
   teacher at level s = sigma_{k+1} (acdmd.py, section 2): every step is trained equally often, each against its
   own marginal, and the gradient is truncated to one network call. The fake-score update and the generator
   update each draw their own simulation.

4. Pictures (pillow; the toy's per-prompt sampling loop), image files and grids (diffusers.utils), and the real
   backbones' teacher sampler: the stock pipeline, equal to euler_sample on bb.teacher_sigmas
   (tests/test_eval_images.py).

CLI:  python sample.py --run runs/toy --n 2000                        -> runs/toy/samples.png
      python sample.py --run runs/sd35 --prompt "a red fox" [--n 4] [--seed 42]
          -> runs/sd35/samples/stage1_ema/000000.png ... grid.png (4 NFE, CPS eta 0.9)
      python sample.py --run runs/sd35 --teacher --steps 28 --cfg 4.5  (the teacher, Euler + CFG)
      python sample.py --model tiny-sd3 --teacher                      (no run needed)
"""
import argparse
import json
import math
import os
import time

import torch

import models
from models import bcast, eps_from_velocity, x0_from_velocity

# --- 1. The CPS step -------------------------------------------------------------------------


def cps_mean_std(x, v, sigma, sigma_next, eta):
    """Mean mu and std rho of one CPS transition from level sigma to sigma_next < sigma (section 1): mu = (1 - sigma')
    x0_hat + sigma' cos(theta) eps_hat, rho = sigma' sin(theta), theta = eta pi / 2. sigma, sigma_next: float or
    Tensor[B]; mu is float32 of x's shape, rho broadcasts against x."""
    # --- exercise cps_step: begin ---
    x, v = x.float(), v.float()
    s = bcast(sigma, x).float()
    s_next = bcast(sigma_next, x).float()
    theta = eta * math.pi / 2
    x0_hat = x0_from_velocity(x, v, s)
    eps_hat = eps_from_velocity(x, v, s)
    mu = (1 - s_next) * x0_hat + s_next * math.cos(theta) * eps_hat
    rho = s_next * math.sin(theta)
    return mu, rho
    # --- exercise cps_step: end ---


def cps_step(x, v, sigma, sigma_next, eta, noise=None):
    """x' = mu + rho z (z = `noise`, drawn fresh when None). Output in x's dtype."""
    # --- exercise cps_step: begin ---
    mu, rho = cps_mean_std(x, v, sigma, sigma_next, eta)
    if noise is None:
        noise = torch.randn_like(mu)
    return (mu + rho * noise.float()).to(x.dtype)
    # --- exercise cps_step: end ---


def full(sigma, x):
    """A float sigma as a per-sample Tensor[B] on x's device."""
    return torch.full((x.shape[0],), float(sigma), device=x.device)


# --- 2. Teacher ODE and generator rollout; 3. backward simulation ----------------------------


def euler_sample(bb, net, x, sigmas, cond, null_cond=None, guidance=1.0):
    """Integrate dx = v dsigma from sigmas[0] to sigmas[-1] with Euler steps, with CFG when guidance != 1 (section
    2): the teacher's multi-step sampler, and on the 4-step sampler sigmas the reference row "teacher 4-step Euler"."""
    for k in range(len(sigmas) - 1):
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        v = models.cfg_velocity(bb, net, x, full(s, x), cond, null_cond, guidance)
        x = (x.float() + (s_next - s) * v.float()).to(x.dtype)
    return x


@torch.no_grad()
def generator_steps(bb, net, x, cond, sigmas, eta, noises=None, first=0):
    """The generator's CPS steps k = first .. len(sigmas)-2 from x (no CFG): [x, x after step first, ...]."""
    states = [x]
    for k in range(first, len(sigmas) - 1):
        v = bb.velocity(net, states[-1], full(sigmas[k], x), cond)
        states.append(cps_step(states[-1], v, float(sigmas[k]), float(sigmas[k + 1]), eta,
                               None if noises is None else noises[k]))
    return states


@torch.no_grad()
def rollout(bb, net, x, cond, sigmas=None, eta=0.9, noises=None):
    """The few-step generator sampler (section 2): at every step k, v = G(x, sigma_k, c) with no CFG, then
    x <- CPS(x, v, sigma_k -> sigma_{k+1}, eta). `noises[k]` optionally fixes the CPS noise of step k. Returns the
    states [x_{sigma_0}, ..., x_{sigma_N}]; the last one is the sample (= x0_hat of the last step)."""
    sigmas = bb.sigmas if sigmas is None else sigmas
    if not getattr(bb, "exact_prefix", False):
        return generator_steps(bb, net, x, cond, sigmas, eta, noises)
    # toy diagnostic: exact states up to the last step
    states = [x] + [bb.mixture.sample(cond["c"].cpu(), float(s)).float() for s in sigmas[1:-1]]
    return states[:-1] + generator_steps(bb, net, states[-1], cond, sigmas, eta, noises, len(sigmas) - 2)


def random_stop(num_steps, rng, last_weight=1.0):
    """The stop index of a backward simulation, uniform on {1, ..., num_steps}: every step k = stop - 1 is trained
    equally often. `rng` is a torch.Generator every rank shares, so all ranks train the same step in an iteration
    (same numbers as a broadcast from rank 0). last_weight != 1 (train.py --last-stop-weight, a departure from the
    paper's uniform draw) gives the last step that many times the others' probability."""
    if last_weight == 1.0:  # the uniform draw keeps its own rng use, so every seed's stops stay as they were
        return int(torch.randint(1, num_steps + 1, (1,), generator=rng))
    w = torch.ones(num_steps, dtype=torch.float64)
    w[-1] = last_weight
    return int(torch.multinomial(w, 1, generator=rng)) + 1


def backward_simulation(bb, net, x, cond, stop, sigmas=None, eta=0.9):
    """Stage-1 backward simulation with random stop (section 3): steps k = 0 .. stop-1 of the sampler from x = eps,
    only the last (k = stop - 1) with autograd, so its input is a constant and the gradient is truncated to one
    network call (the step-k objective, acdmd.py section 2). Returns a dict: x_in, v (last step's input state and
    velocity), sigma, sigma_next (floats), x_next (the CPS output = x_s of AC-DMD, differentiable through x0_hat
    and eps_hat; the fresh noise is a constant) and x0_hat of the last step."""
    sigmas = bb.sigmas if sigmas is None else sigmas
    assert 1 <= stop <= len(sigmas) - 1, stop
    with torch.no_grad():
        x = generator_steps(bb, net, x, cond, sigmas[:stop], eta)[-1]
    k = stop - 1
    s, s_next = float(sigmas[k]), float(sigmas[k + 1])
    v = bb.velocity(net, x, full(s, x), cond)
    x_next = cps_step(x, v, s, s_next, eta)
    return dict(x_in=x, v=v, sigma=s, sigma_next=s_next, x_next=x_next,
                x0_hat=x0_from_velocity(x.float(), v.float(), s))


# --- 4. Pictures (pillow) and images (diffusers.utils); the toy's per-prompt sampling loop ---

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]  # by prompt
GREY = (200, 200, 200)


def scatter_png(panels, path, size=260, lim=3.2, max_points=None):
    """The project's one scatter plotter. panels: one row [panel, ...] or rows [[panel, ...], ...]; a panel is
    (title, points [N, 2], labels [N] ints: colour PALETTE[label]) or a dict with "title", "layers" [(points, RGB)]
    drawn in order (at most max_points each), and optionally "circles" [((cx, cy), radius)] (reward contours,
    dotted) and "cross" (cx, cy) (the reward's optimum)."""
    from PIL import Image, ImageDraw
    grid = [panels] if not isinstance(panels[0], list) else panels
    grid = [[p if isinstance(p, dict) else {"title": p[0], "layers": [
        (p[1][p[2] == i], PALETTE[i % len(PALETTE)]) for i in p[2].unique().tolist()]} for p in r] for r in grid]
    top, scale = 16, (size - 6) / (2 * lim)
    img = Image.new("RGB", (size * max(map(len, grid)), (size + top) * len(grid)), "white")
    draw = ImageDraw.Draw(img)
    for ri, row in enumerate(grid):
        for ci, panel in enumerate(row):
            ox, oy = ci * size, ri * (size + top)
            px = lambda x, y: (ox + 3 + (x + lim) * scale, oy + top + size - 3 - (y + lim) * scale)
            draw.rectangle([ox + 1, oy + top, ox + size - 2, oy + top + size - 2], outline=GREY)
            draw.text((ox + 4, oy + 2), panel["title"], fill="black")
            for (cx, cy), rad in panel.get("circles", []):
                for a in torch.linspace(0, 2 * math.pi, 400).tolist():
                    x, y = cx + rad * math.cos(a), cy + rad * math.sin(a)
                    if abs(x) < lim and abs(y) < lim:
                        draw.point([px(x, y)], fill=(255, 150, 40))
            for pts, colour in panel["layers"]:
                for x, y in pts[:max_points].detach().float().cpu().clamp(-lim, lim).tolist():
                    u, v = px(x, y)
                    draw.rectangle([u, v, u + 1, v + 1], fill=colour)
            if "cross" in panel:
                u, v = px(*panel["cross"])
                draw.line([u - 6, v, u + 6, v], fill="black", width=2)
                draw.line([u, v - 6, u, v + 6], fill="black", width=2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path, optimize=True)
    return path


@torch.no_grad()
def toy_rollouts(bb, nets, n, noise_gen, cps_seed):
    """The toy's one per-prompt sampling loop: for every prompt ci, n initial points drawn from noise_gen(ci) (a
    torch.Generator), then every row of nets {name: net} from that same noise, the global RNG (the CPS noise)
    seeded cps_seed(ci) first; a net None is the teacher's Euler ODE on the sampler's sigmas (the reference row
    "teacher 4-step Euler"). Returns {prompt: (x, cond, {name: [x_sigma_0, ..., x_sigma_N]})}."""
    out = {}
    for ci, prompt in enumerate(bb.prompts):
        cond = bb.encode([prompt] * n)
        x = torch.randn(n, *bb.latent_shape, generator=noise_gen(ci))
        states = {}
        for name, net in nets.items():
            torch.manual_seed(cps_seed(ci))
            if net is not None:
                states[name] = rollout(bb, net, x, cond)
                continue
            states[name] = [x]
            for k in range(len(bb.sigmas) - 1):
                states[name].append(euler_sample(bb, bb.teacher, states[name][-1], bb.sigmas[k:k + 2], cond))
        out[prompt] = (x, cond, states)
    return out


def toy_scatter_png(bb, net, path, n_per_prompt=600, seed=0):
    """Exact teacher samples next to each state of the 4-step generator, coloured by prompt."""
    g = torch.Generator().manual_seed(seed)
    runs = toy_rollouts(bb, {"g": net}, n_per_prompt, lambda ci: g, lambda ci: seed + ci)
    c = torch.arange(len(bb.prompts)).repeat_interleave(n_per_prompt)
    states = [torch.cat(s) for s in zip(*(r[2]["g"] for r in runs.values()))]
    return scatter_png([("exact teacher p(x|c)", bb.mixture.sample(c, generator=g), c)] + [
        (f"generator after step {k} (sigma {float(bb.sigmas[k]):.2f})", states[k], c)
        for k in range(1, len(states))], path)


def to_pil(images):
    """[B, 3, H, W] in [0, 1] (backbone.decode) -> PIL images, rounded to 8 bits."""
    from diffusers.utils import pt_to_pil
    return pt_to_pil(images.detach().float().clamp(0, 1) * 2 - 1)  # pt_to_pil takes [-1, 1]


def save_images(images, path):
    """One PNG per image in the folder `path` (000000.png, ...); returns the file names."""
    os.makedirs(path, exist_ok=True)
    names = [os.path.join(path, f"{i:06d}.png") for i in range(len(images))]
    for name, im in zip(names, to_pil(images)):
        im.save(name)
    return names


def image_grid(images, nrow=None):
    """All images tiled in one PIL image, `nrow` per row (default: about square); empty cells white."""
    from PIL import Image
    from diffusers.utils import make_image_grid
    ims = to_pil(images)
    nrow = nrow or math.ceil(math.sqrt(len(ims)))
    rows = math.ceil(len(ims) / nrow)
    return make_image_grid(ims + [Image.new("RGB", ims[0].size, "white")] * (rows * nrow - len(ims)), rows, nrow)


def save_grid(images, path, nrow=None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image_grid(images, nrow).save(path)
    return path


# --- Images from prompts: the few-step generator and the many-step teacher -------------------


def initial_noise(bb, prompts, n, seed):
    """n initial latents per prompt from one seeded CPU generator, in prompt order (the same images on any device),
    as one batch (noise [n, ...], [prompt] * n) per prompt."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts) * n, *bb.latent_shape, generator=g).to(bb.device)
    return [(x[i * n:(i + 1) * n], [p] * n) for i, p in enumerate(prompts)]


@torch.no_grad()
def generator_images(bb, net, prompts, n=1, seed=42, eta=0.9):
    """Images [P*n, 3, H, W] in [0, 1] from the 4-step generator (section 2), one batch per prompt. The CPS noise
    comes from the global RNG, seeded here inside fork_rng (the caller's is kept)."""
    batches = initial_noise(bb, prompts, n, seed)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if bb.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return torch.cat([bb.decode(rollout(bb, net, x, bb.encode(ps), eta=eta)[-1]).cpu() for x, ps in batches])


@torch.no_grad()
def teacher_batch(bb, x, prompts, steps=28, guidance=None):
    """The real backbones' one teacher sampler: the stock pipeline (bb.pipeline_latents: Euler on
    bb.teacher_sigmas(steps), CFG `guidance` against "", default the backbone's; equal to euler_sample on those
    sigmas) from our latents x, on our text embeddings (so a --cache-text-embeddings run can use it too),
    decoded to images [B, 3, H, W] in [0, 1]."""
    bb.pipe.set_progress_bar_config(disable=True)
    return bb.decode_vae(bb.pipeline_latents(list(prompts), x, steps, guidance))


@torch.no_grad()
def teacher_images(bb, prompts, n=1, seed=42, steps=28, guidance=None):
    """Images [P*n, 3, H, W] from the frozen teacher (teacher_batch), one batch per prompt."""
    return torch.cat([teacher_batch(bb, x, ps, steps, guidance).cpu() for x, ps in initial_noise(bb, prompts, n, seed)])


def sampling_speed(bb, net, prompts, n, steps=28, guidance=None, eta=0.9, repeats=3):
    """Images per second of the 4-step generator (4 network calls, no CFG) and of the teacher (`steps` Euler steps
    with CFG: one batched call of 2n rows a step unless guidance is 1), on the same prompts, resolution and batch
    (n images per prompt), each the mean of `repeats` calls after two warm-up calls (torch.utils.benchmark.Timer,
    which synchronises CUDA). Two views: the samplers alone (text encoded, latents not decoded: the part the
    4-step generator shortens; the teacher as euler_sample, which equals the pipeline) and end to end (text
    encoding and VAE decoding too)."""
    from torch.utils.benchmark import Timer
    g = bb.guidance if guidance is None else guidance
    batches = [(x, bb.encode(ps)) for x, ps in initial_noise(bb, prompts, n, seed=0)]
    null, sigmas = bb.encode([""] * n), bb.teacher_sigmas(steps)
    fns = dict(generator_sampler=lambda: [rollout(bb, net, xb, c, eta=eta) for xb, c in batches],
               teacher_sampler=lambda: [euler_sample(bb, bb.teacher, xb, sigmas, c, null, g) for xb, c in batches],
               generator_end_to_end=lambda: generator_images(bb, net, prompts, n, eta=eta),
               teacher_end_to_end=lambda: teacher_images(bb, prompts, n, steps=steps, guidance=g))
    with torch.no_grad():
        t = {k: Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).timeit(repeats).mean
             for k, fn in fns.items()}
    images = len(prompts) * n
    return dict(images=images, batch=n, resolution=getattr(bb, "resolution", None), repeats=repeats,
                generator_nfe=len(bb.sigmas) - 1, teacher_nfe=steps * (1 if g == 1.0 else 2),
                teacher_steps=steps, teacher_cfg=g, device=str(bb.device), dtype=str(bb.dtype),
                **{f"{k}_images_per_s": images / v for k, v in t.items()},
                speedup_sampler=t["teacher_sampler"] / t["generator_sampler"],
                speedup_end_to_end=t["teacher_end_to_end"] / t["generator_end_to_end"])


# --- CLI -------------------------------------------------------------------------------------


def get_parser():
    p = argparse.ArgumentParser(description="Draw samples from a trained run, from --model with --lora files merged "
                                "(the released RTDMD models), or from the teacher.")
    p.add_argument("--run", default=None, help="run folder written by train.py")
    p.add_argument("--stage", type=int, default=None, help="1 or 2 (default: the latest)")
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeat for several)")
    p.add_argument("--n", type=int, default=None, help="images per prompt (toy: points per prompt)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eta", type=float, default=0.9, help="CPS stochasticity of the generator")
    p.add_argument("--teacher", action="store_true", help="sample the frozen teacher instead")
    p.add_argument("--steps", type=int, default=28, help="teacher: Euler steps")
    p.add_argument("--cfg", type=float, default=None, help="teacher: CFG scale (default: backbone's)")
    p.add_argument("--model", default=None, help="teacher without --run: the backbone to load")
    p.add_argument("--pretrained", default=None, help="teacher without --run: hub id or folder")
    p.add_argument("--resolution", type=int, default=None, help="teacher without --run")
    p.add_argument("--out", default=None, help="output folder (toy: PNG file); default in RUN/")
    p.add_argument("--speed", action="store_true", help="time the 4-step generator against the teacher (--steps, "
                   "--cfg) on the same batch; without --run, the generator's base network stands in (same cost)")
    p.add_argument("--lora", nargs="+", default=None, metavar="PATH", help="with --model: the generator is its base "
                   "with these LoRAs merged in order (a released model's stage-1 then stage-2 generator_ema.pt; .pt, "
                   ".safetensors or peft folders)")
    p.add_argument("--export-lora", default=None, metavar="FILE", help="with --lora: write the stacked LoRAs as one "
                   "exact diffusers/peft LoRA of the summed rank (.safetensors, for pipe.load_lora_weights) and exit; "
                   "needs no --model")
    return p


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.export_lora:
        if not args.lora:
            p.error("--export-lora needs --lora PATH [PATH ...]")
        path = models.export_stacked_lora(args.lora, args.export_lora)
        print(f"{len(args.lora)} LoRAs stacked into one -> {path}")
        return path
    if args.lora and (args.run is not None or args.model is None or args.teacher):
        p.error("--lora merges into --model's generator base: pass --model NAME --lora PATH ..., without --run")
    if args.run is None and not ((args.teacher or args.speed or args.lora) and args.model):
        p.error("pass --run RUN, or --model NAME --lora PATH ..., or --teacher --model NAME "
                "(or --speed --model NAME) without a run")
    cuda = torch.cuda.is_available()
    kw = dict(device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)  # paper: bf16
    t0 = time.time()
    if args.run is not None:
        bb, net, stage = models.load_run(args.run, args.stage, **kw)
    else:
        bb = models.load(args.model, pretrained=args.pretrained, resolution=args.resolution, **kw)
        net, stage = (models.merged_generator(bb, args.lora), "lora") if args.lora else (bb.generator_base, None)
    t_load, t0 = time.time() - t0, time.time()
    root = args.run or os.path.join("samples", args.model)

    if args.speed:
        if bb.name.startswith("toy"):
            p.error("--speed times image backbones; the toy's teacher is a closed form, not a network")
        r = sampling_speed(bb, net, args.prompt or bb.prompts[:2], args.n or 4, args.steps, args.cfg, args.eta)
        print(f"{r['images']} images of {r['resolution']} px, batch {r['batch']}, on {r['device']} ({r['dtype']}), "
              f"mean of {r['repeats']} after warm-up; images/s, samplers alone | end to end:")
        for who, what in (("generator", f"{r['generator_nfe']} NFE"),
                          ("teacher", f"{r['teacher_steps']} steps, CFG {r['teacher_cfg']} ({r['teacher_nfe']} NFE)")):
            print(f"  {who}, {what}: {r[who + '_sampler_images_per_s']:.3f} | {r[who + '_end_to_end_images_per_s']:.3f}")
        print(f"  speed-up: {r['speedup_sampler']:.1f}x | {r['speedup_end_to_end']:.1f}x")
        out = args.out or os.path.join(root, "speed.json")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(r, f, indent=2)
        return r

    if bb.name == "toy":  # the toy keeps its scatter plot
        if args.run is None:
            p.error("the toy's teacher is the exact mixture: pass --run to plot a toy run")
        out = toy_scatter_png(bb, net, args.out or os.path.join(args.run, "samples.png"), n_per_prompt=args.n or 600)
        print(f"stage-{stage} EMA generator: {len(bb.sigmas) - 1} NFE per sample, {time.time() - t0:.2f}s -> {out}")
        return out

    prompts, n = args.prompt or bb.prompts[:4], args.n or 4
    if args.teacher:
        g = bb.guidance if args.cfg is None else args.cfg
        images = teacher_images(bb, prompts, n, args.seed, args.steps, g)
        nfe = args.steps * (1 if g == 1.0 else 2)  # CFG: a conditional and an unconditional pass
        what, name = f"teacher, {args.steps} Euler steps, CFG {g}", f"teacher_{args.steps}steps_cfg{g}"
    else:
        images, nfe = generator_images(bb, net, prompts, n, args.seed, args.eta), len(bb.sigmas) - 1
        what = (f"{args.model} + {len(args.lora)} merged LoRA(s)" if args.lora else
                f"stage-{stage} EMA generator") + f", CPS eta {args.eta}, no CFG"
        name = "lora" if args.lora else f"stage{stage}_ema"
    wall, out = time.time() - t0, args.out or os.path.join(root, "samples", name)
    save_images(images, out)
    grid = save_grid(images, os.path.join(out, "grid.png"), nrow=n)  # one row per prompt
    print(f"{what}: {nfe} NFE per image, {len(images)} images in {wall:.2f}s (+{t_load:.1f}s loading) -> "
          f"{out}/000000.png ... and {grid}")
    print("\n".join(f"  row {i}: {pr!r}" for i, pr in enumerate(prompts)))
    return out


if __name__ == "__main__":
    main()
