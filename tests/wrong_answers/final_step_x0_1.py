"""Wrong answer for exercise final_step_x0: x_3 not detached, so reward gradients would flow back
through the stored state into steps 0-2."""


def final_step_x0(bb, net, x3, sigma3, cond):
    v = bb.velocity(net, x3, full(sigma3, x3), cond)
    return x0_from_velocity(x3.float(), v.float(), sigma3)
