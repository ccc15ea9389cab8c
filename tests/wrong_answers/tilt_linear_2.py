"""Wrong answer for exercise tilt_linear: the weights tilted by exp(beta a^T mu_j) only, the
beta^2 s_j^2 |a|^2 / 2 term of each component's normaliser left out."""


def tilt_linear(mixture, a, beta):
    a = torch.as_tensor(a, dtype=torch.float64)
    s2 = mixture.stds ** 2
    log_f = beta * mixture.means @ a
    means = mixture.means + beta * s2[:, None] * a[None]
    return models.Mixture(means, mixture.stds.clone(), tilted_weights(mixture.weights, log_f))
