"""Wrong answer for exercise ambient_target: -x_s instead of -x_s/(1-s) (x_s taken for x0)."""


def ambient_target(x_s, n, s, t):
    s, t = bcast(s, x_s), bcast(t, x_s)
    sigma_ts = torch.sqrt(torch.clamp(t ** 2 - ((1 - t) / (1 - s)) ** 2 * s ** 2, min=1e-12))
    return -x_s + (t + (1 - t) * s ** 2 / (1 - s) ** 2) / sigma_ts * n
