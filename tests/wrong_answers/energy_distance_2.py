"""Wrong answer for exercise energy_distance: squared distances, which only compare means."""


def energy_distance(x, y):
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).pow(2).mean() - torch.cdist(x, x).pow(2).mean()
            - torch.cdist(y, y).pow(2).mean()).item()
