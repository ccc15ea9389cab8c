"""Wrong answer for exercise group_advantages: the sample std (divide by N - 1) instead of the
population std, and every reward in the dict counted (weights of unlisted rewards taken as 1)."""


def group_advantages(rewards, prompts, weights, eps=1e-4, normalize=True):
    N = len(prompts)
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    A = torch.zeros(N, dtype=torch.float64)
    for name in rewards:
        w = weights.get(name, 1.0)
        r = rewards[name].detach().double().cpu().reshape(N)
        centred = torch.empty_like(r)
        for idx in groups.values():
            centred[idx] = r[idx] - r[idx].mean()
        A += w * (centred / (r.std() + eps) if normalize else centred)
    if normalize:
        A = (A - A.mean()) / (A.std() + eps)
    return A.float()
