"""Wrong answer for exercise dmd_direction: two independent projection noises, so the DMD
direction carries s sin(theta) (z_fake - z_real) of pure noise."""


def shared_projection(x_t, v_real, v_fake, t, s, eta):
    x_s_real = cps_step(x_t, v_real, t, s, eta)
    x_s_fake = cps_step(x_t, v_fake, t, s, eta)
    return x_s_real, x_s_fake
