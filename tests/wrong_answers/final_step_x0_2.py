"""Wrong answer for exercise final_step_x0: x_3 - (1 - sigma_3) v (the eps formula's coefficient)
and a hinge with the sign turned round in bp_loss."""


def final_step_x0(bb, net, x3, sigma3, cond):
    x3 = x3.detach()
    v = bb.velocity(net, x3, full(sigma3, x3), cond)
    return x3.float() - (1 - sigma3) * v.float()


def bp_loss(rewards_weighted_sum, margin=3.0):
    R = rewards_weighted_sum.float()
    loss = torch.relu(R - margin).mean()
    stats = dict(reward_mean=R.mean().item(), hinge_active=(R < margin).float().mean().item())
    return loss, stats
