"""Wrong answer for exercise renoise: the signal factor inverted, a = (1-s)/(1-t)."""


def subinterval_coeffs(s, t):
    a = (1 - s) / (1 - t)
    sigma_ts = torch.sqrt(torch.clamp(t ** 2 - a ** 2 * s ** 2, min=1e-12))
    return a, sigma_ts
