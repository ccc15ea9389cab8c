"""Wrong answer for exercise cps_step: the cos(theta) factor on eps_hat is left out, as if the
step were DDIM's deterministic update plus extra noise. The total noise std exceeds sigma'."""


def cps_mean_std(x, v, sigma, sigma_next, eta):
    x, v = x.float(), v.float()
    s = bcast(sigma, x).float()
    s_next = bcast(sigma_next, x).float()
    theta = eta * math.pi / 2
    x0_hat = x0_from_velocity(x, v, s)
    eps_hat = eps_from_velocity(x, v, s)
    mu = (1 - s_next) * x0_hat + s_next * eps_hat
    rho = s_next * math.sin(theta)
    return mu, rho
