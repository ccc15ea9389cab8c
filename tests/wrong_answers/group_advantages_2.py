"""Wrong answer for exercise group_advantages: normalize=False drops the reward weights."""


def group_advantages(rewards, prompts, weights, eps=1e-4, normalize=True):
    N = len(prompts)
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    A = torch.zeros(N, dtype=torch.float64)
    for name, w in weights.items():
        r = rewards[name].detach().double().cpu().reshape(N)
        centred = torch.empty_like(r)
        for idx in groups.values():
            centred[idx] = r[idx] - r[idx].mean()
        A += w * centred / (r.std(unbiased=False) + eps) if normalize else centred
    if normalize:
        A = (A - A.mean()) / (A.std(unbiased=False) + eps)
    return A.float()
