"""Wrong answer for exercise energy_distance: U-statistics for the within-set terms (self pairs
left out), which the docstring does not ask for."""


def energy_distance(x, y):
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    exx = torch.cdist(x, x).sum() / (n * (n - 1))
    eyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return (2 * torch.cdist(x, y).mean() - exx - eyy).item()
