"""Wrong answer for exercise dmd_direction: the direction points the wrong way (real - fake), so
descending it pushes samples away from the teacher."""


def dmd_direction(x_s, x_s_real, x_s_fake, normalize=True):
    g = (x_s_real - x_s_fake).double()
    if normalize:
        dims = tuple(range(1, x_s.dim()))
        scale = (x_s.detach().double() - x_s_real.double()).abs().mean(dim=dims, keepdim=True)
        g = g / scale
    return torch.nan_to_num(g)
