"""Wrong answer for exercise ppo_loss: the sign of the surrogate flipped (A r maximised by a
minimiser), so the policy moves away from high-advantage samples."""


def ppo_loss(log_prob_new, log_prob_old, advantages, clip_range=1e-5):
    A = advantages.detach().float()
    log_ratio = log_prob_new.float() - log_prob_old.detach().float()
    ratio = torch.exp(log_ratio)
    unclipped = A * ratio
    clipped = A * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = dict(ratio_mean=ratio.mean().item(), ratio_min=ratio.min().item(),
                     ratio_max=ratio.max().item(),
                     clip_frac=((ratio - 1).abs() > clip_range).float().mean().item(),
                     approx_kl=(0.5 * log_ratio ** 2).mean().item())
    return loss, stats
