"""Wrong answer for exercise cps_log_prob: the official form sums over the elements instead of
averaging (a factor D too large)."""


def cps_log_prob(x_next, x, v, sigma, sigma_next, eta, form="official"):
    mu, rho = cps_mean_std(x, v, sigma, sigma_next, eta)
    x_next = x_next.detach().float()
    dims = tuple(range(1, x.dim()))
    D = x[0].numel()
    rho = torch.as_tensor(rho, dtype=torch.float32, device=mu.device).expand(len(x), *mu.shape[1:])
    rho = rho.reshape(len(x), -1)[:, 0]
    stochastic = rho > 0
    sq = ((x_next - mu) ** 2).sum(dims)
    if form == "official":
        lp = -sq
    else:
        rho_safe = torch.where(stochastic, rho, torch.ones_like(rho))
        lp = -sq / (2 * rho_safe ** 2) - D * torch.log(rho_safe) - 0.5 * D * math.log(2 * math.pi)
    return torch.where(stochastic, lp, torch.zeros_like(lp))
