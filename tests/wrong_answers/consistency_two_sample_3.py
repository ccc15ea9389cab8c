"""Wrong answer for exercise consistency_two_sample: the estimate clamped at 0 ("a squared norm
cannot be negative"), which biases it upward near the optimum."""


def consistency_two_sample(h0, h1, h2):
    return torch.nan_to_num(torch.relu(((h1 - h0) * (h2 - h0)).mean()))
