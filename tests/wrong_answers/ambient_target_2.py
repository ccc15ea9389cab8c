"""Wrong answer for exercise ambient_target: (1-s) instead of (1-s)^2 in the correction term."""


def ambient_target(x_s, n, s, t):
    s, t = bcast(s, x_s), bcast(t, x_s)
    sigma_ts = torch.sqrt(torch.clamp(t ** 2 - ((1 - t) / (1 - s)) ** 2 * s ** 2, min=1e-12))
    return -x_s / (1 - s) + (t + (1 - t) * s ** 2 / (1 - s)) / sigma_ts * n
