"""Wrong answer for exercise consistency_two_sample: the square of the two-sample average,
biased upward by half the variance of h(x')."""


def consistency_two_sample(h0, h1, h2):
    return torch.nan_to_num((((h1 + h2) / 2 - h0) ** 2).mean())
