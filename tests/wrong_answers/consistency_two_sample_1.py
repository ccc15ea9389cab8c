"""Wrong answer for exercise consistency_two_sample: the one-sample MSE, biased upward by the
variance of h(x')."""


def consistency_two_sample(h0, h1, h2):
    return torch.nan_to_num(((h1 - h0) ** 2).mean())
