"""Wrong answer for exercise cps_step: theta = eta * pi (the /2 forgotten), so cos and sin are
evaluated at the wrong angle."""


def cps_mean_std(x, v, sigma, sigma_next, eta):
    x, v = x.float(), v.float()
    s = bcast(sigma, x).float()
    s_next = bcast(sigma_next, x).float()
    theta = eta * math.pi
    x0_hat = x0_from_velocity(x, v, s)
    eps_hat = eps_from_velocity(x, v, s)
    mu = (1 - s_next) * x0_hat + s_next * math.cos(theta) * eps_hat
    rho = s_next * math.sin(theta)
    return mu, rho
