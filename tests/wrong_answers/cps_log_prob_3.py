"""Wrong answer for exercise cps_log_prob: x_next not detached, so the policy gradient also pushes
on the stored action; and no special case for deterministic steps (the exact form divides by 0)."""


def cps_log_prob(x_next, x, v, sigma, sigma_next, eta, form="official"):
    mu, rho = cps_mean_std(x, v, sigma, sigma_next, eta)
    dims = tuple(range(1, x.dim()))
    D = x[0].numel()
    rho = torch.as_tensor(rho, dtype=torch.float32, device=mu.device).expand(len(x), *mu.shape[1:])
    rho = rho.reshape(len(x), -1)[:, 0]
    sq = ((x_next.float() - mu) ** 2).sum(dims)
    if form == "official":
        return -sq / D
    return -sq / (2 * rho ** 2) - D * torch.log(rho) - 0.5 * D * math.log(2 * math.pi)
