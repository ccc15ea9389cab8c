"""Wrong answer for exercise cps_step: theta = eta pi, the /2 left out. The step still looks like
a rotation, but eta = 1 gives cos(theta) = -1 and no fresh noise instead of a pure-noise step."""


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
