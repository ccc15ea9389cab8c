"""Wrong answer for exercise final_step_x0: bp_loss without the hinge (mean of margin - R), so
the reward gradient never switches off."""


def bp_loss(rewards_weighted_sum, margin=3.0):
    R = rewards_weighted_sum.float()
    loss = (margin - R).mean()
    stats = dict(reward_mean=R.mean().item(), hinge_active=(R < margin).float().mean().item())
    return loss, stats
