"""Wrong answer for exercise ambient_target: plain flow matching applied to x_s as if it were
clean data; the (1-t) s^2/(1-s)^2 correction of the noise coefficient is missing."""


def ambient_target(x_s, n, s, t):
    s, t = bcast(s, x_s), bcast(t, x_s)
    sigma_ts = torch.sqrt(torch.clamp(t ** 2 - ((1 - t) / (1 - s)) ** 2 * s ** 2, min=1e-12))
    return -x_s / (1 - s) + t / sigma_ts * n
