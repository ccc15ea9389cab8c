"""Wrong answer for exercise cps_step: sin and cos swapped, so eta = 0.9 keeps almost no
predicted noise and adds almost all of it fresh (and eta = 0 is no longer Euler)."""


def cps_mean_std(x, v, sigma, sigma_next, eta):
    x, v = x.float(), v.float()
    s = bcast(sigma, x).float()
    s_next = bcast(sigma_next, x).float()
    theta = eta * math.pi / 2
    x0_hat = x0_from_velocity(x, v, s)
    eps_hat = eps_from_velocity(x, v, s)
    mu = (1 - s_next) * x0_hat + s_next * math.sin(theta) * eps_hat
    rho = s_next * math.cos(theta)
    return mu, rho
