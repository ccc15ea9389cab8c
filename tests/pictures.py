"""Pictures for the course (tests/assignments.py `picture NAME`): the student's own code next to
the exact answer, on the toy mixture (models.py, section 2), drawn with sample.scatter_png.

    cps_step     a 20-step CPS sampler (exact velocity, eta 0.9) at four levels | exact p_sigma
    renoise      renoise(x_s ~ p_s, s -> t) | exact p_t, for three (s, t)
    tilt_linear  the teacher | tilt_linear(teacher, a = (1, 0), beta = 1) | importance-resampled
                 teacher samples, the exact tilted law up to resampling noise

Run with the interpreter that has torch:  python tests/pictures.py NAME PNG
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import acdmd  # noqa: E402
import models  # noqa: E402
import rewards  # noqa: E402
import sample  # noqa: E402

N = 500  # points per prompt


def layers(x, c):
    return [(x[c == i], sample.PALETTE[i]) for i in range(3)]


def picture(name, g):
    mix = models.toy_mixture()
    c = torch.arange(3).repeat_interleave(N)
    full = lambda s: torch.full((len(c),), float(s))
    if name == "cps_step":
        # 20 steps, so that the picture shows the step's law and not the error of a coarse grid
        sig, x = [1 - k / 20 for k in range(21)], torch.randn(len(c), 2, generator=g)
        rows = [[], []]
        for k, (s, s_next) in enumerate(zip(sig, sig[1:])):
            x = sample.cps_step(x, mix.velocity(x, full(s), c), s, s_next, 0.9)
            if (k + 1) % 5 == 0:
                rows[0].append({"title": f"your cps_step: sigma {s_next:.2g}", "layers": layers(x, c)})
                rows[1].append({"title": f"exact p_sigma, sigma {s_next:.2g}",
                                "layers": layers(mix.sample(c, s_next, generator=g), c)})
        return rows
    if name == "renoise":
        rows = [[], []]
        for s, t in ((0.0, 0.3), (0.3, 0.6), (0.6, 0.9)):
            x_s = mix.sample(c, s, generator=g)
            x_t = acdmd.renoise(x_s, full(s), full(t), torch.randn(x_s.shape, generator=g))
            rows[0].append({"title": f"your renoise {s:g} -> {t:g}", "layers": layers(x_t, c)})
            rows[1].append({"title": f"exact p_t, t {t:g}", "layers": layers(mix.sample(c, t, generator=g), c)})
        return rows
    if name == "tilt_linear":
        a, beta = torch.tensor([1.0, 0.0]), 1.0
        tilted = rewards.tilt_linear(mix, a, beta)
        big = torch.arange(3).repeat_interleave(20 * N)  # p exp(beta a^T x) / Z by resampling
        x = mix.sample(big, generator=g)
        picks = torch.cat([torch.multinomial(torch.exp(beta * x[big == i] @ a), N, generator=g) + 20 * N * i
                           for i in range(3)])
        return [[{"title": "teacher p(x|c)", "layers": layers(mix.sample(c, generator=g), c)},
                 {"title": "your tilt_linear", "layers": layers(tilted.sample(c, generator=g), c)},
                 {"title": "p exp(beta a.x)/Z, resampled", "layers": layers(x[picks], c)}]]
    sys.exit(f"pictures: no picture for {name}; there are cps_step, renoise, tilt_linear")


if __name__ == "__main__":
    name, png = sys.argv[1], sys.argv[2]
    try:
        grid = picture(name, torch.Generator().manual_seed(0))
    except NotImplementedError as e:
        sys.exit(f"pictures: {e}; the picture needs that exercise done")
    print(sample.scatter_png(grid, png, size=200, max_points=1500))
