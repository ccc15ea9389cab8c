"""Wrong answer for exercise dmd_direction: one normalisation for the whole batch (mean over
every element) instead of one per sample."""


def dmd_direction(x_s, x_s_real, x_s_fake, normalize=True):
    g = (x_s_fake - x_s_real).double()
    if normalize:
        scale = (x_s.detach().double() - x_s_real.double()).abs().mean()
        g = g / scale
    return torch.nan_to_num(g)
