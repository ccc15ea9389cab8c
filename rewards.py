"""
rewards.py -- r(samples, prompts): what stage 2 maximises.

Every reward is a callable  reward(samples, prompts) -> {name: Tensor[B]}  and is differentiable
in `samples` where the method back-propagates through it (ALGORITHM.md 5.7, 6).

    1. toy rewards of a 2-D point, each with its exact reward-tilted mixture (ALGORITHM.md 9.5)
    2. image rewards: CLIPScore, PickScore, Aesthetic, HPSv2.1, ImageReward (REWARDS.md)
    3. the weighted multi-reward
"""
import torch

import models

# ---------------------------------------------------------------------------------------------
# 1. Toy rewards and their exact tilts
# ---------------------------------------------------------------------------------------------

# The toy world's "images" are 2-D points x [B, 2] (ToyBackbone.decode is the identity). Both
# rewards ignore the prompt, are differentiable in x, and tilt an isotropic mixture
#     p(x|c) = sum_j pi_cj N(x; mu_j, s_j^2 I)
# into another isotropic mixture, in closed form (ALGORITHM.md 9.5), because a Gaussian times
# exp(linear or quadratic) is again a Gaussian times a constant:
#     N(x; mu_j, s_j^2 I) exp(beta r(x)) = f_j  N(x; mu~_j, s~_j^2 I),
# so  p~(x|c) = p(x|c) exp(beta r(x)) / Z_beta(c)  has weights  pi~_cj = pi_cj f_j / Z_beta(c),
# with  Z_beta(c) = sum_j pi_cj f_j.  Every row of the weight table is tilted this way, the null
# row "" included: its tilt is the tilt of p(x|null), which in general is *not* the mean of the
# tilted conditional rows (irrelevant for the exactness checks, which use g = 1).


def tilted_weights(weights, log_f):
    """pi~_cj = pi_cj f_j / sum_j' pi_cj' f_j'  for every row c. weights [C, J], log_f [J]."""
    return torch.softmax(torch.log(weights) + log_f[None], dim=1)


def tilt_linear(mixture, a, beta):
    """Exact tilt of an isotropic mixture by exp(beta a^T x) (ALGORITHM.md 9.5):
        mu~_j = mu_j + beta s_j^2 a,   s~_j = s_j,
        log f_j = beta a^T mu_j + 1/2 beta^2 s_j^2 |a|^2.
    Returns a new models.Mixture (weights [C, J], one row per condition, null row included)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    s2 = mixture.stds ** 2
    log_f = beta * mixture.means @ a + 0.5 * beta ** 2 * s2 * (a @ a)
    means = mixture.means + beta * s2[:, None] * a[None]
    return models.Mixture(means, mixture.stds.clone(), tilted_weights(mixture.weights, log_f))


def quadratic_log_f(mixture, gamma, m, beta):
    """log f_j for r = -(gamma/2)|x - m|^2, up to a j-independent constant:
        f_j  prop. to  N(mu_j; m, (s_j^2 + 1/(beta gamma)) I)
             = (1 + bg s_j^2)^(-d/2) exp(-bg |mu_j - m|^2 / (2 (1 + bg s_j^2))) * const,
    with bg = beta gamma.
    The second form is exactly E_{N(mu_j, s_j^2)}[exp(beta r)] (so sum_j pi_cj f_j = Z_beta(c))
    and stays finite at beta = 0."""
    m = torch.as_tensor(m, dtype=torch.float64)
    bg = beta * gamma
    s2 = mixture.stds ** 2
    assert bool((1 + bg * s2 > 0).all()), "beta * gamma too negative: the tilt is not normalisable"
    d = mixture.means.shape[1]
    dist2 = ((mixture.means - m) ** 2).sum(1)
    return -0.5 * d * torch.log1p(bg * s2) - bg * dist2 / (2 * (1 + bg * s2))


def tilt_quadratic(mixture, gamma, m, beta):
    """Exact tilt of an isotropic mixture by exp(-beta gamma/2 |x - m|^2) (ALGORITHM.md 9.5):
        precision 1/s~_j^2 = 1/s_j^2 + beta gamma,   i.e. s~_j^2 = s_j^2 / (1 + beta gamma s_j^2),
        mu~_j = (mu_j / s_j^2 + beta gamma m) / (1/s_j^2 + beta gamma),
        pi~_cj prop. to pi_cj N(mu_j; m, (s_j^2 + 1/(beta gamma)) I)    (quadratic_log_f).
    Returns a new models.Mixture."""
    m = torch.as_tensor(m, dtype=torch.float64)
    bg = beta * gamma
    s2 = mixture.stds ** 2
    prec = 1 / s2 + bg
    means = (mixture.means / s2[:, None] + bg * m[None]) / prec[:, None]
    log_f = quadratic_log_f(mixture, gamma, m, beta)
    return models.Mixture(means, (1 / prec).sqrt(), tilted_weights(mixture.weights, log_f))


class LinearReward:
    """r(x) = a^T x. Callable (samples [B, d], prompts) -> {name: Tensor[B]}, differentiable."""

    def __init__(self, a=(1.0, 0.0), name="linear"):
        self.a = torch.as_tensor(a, dtype=torch.float64)
        self.name = name

    def __call__(self, samples, prompts=None):
        return {self.name: samples @ self.a.to(samples)}

    def tilt(self, mixture, beta):
        """The exact tilted mixture p(x|c) exp(beta r(x)) / Z_beta(c)."""
        return tilt_linear(mixture, self.a, beta)

    def exact_mean(self, mixture):
        """E_{p(x|c)}[r] = sum_j pi_cj a^T mu_j, Tensor[C] (float64)."""
        return mixture.weights @ (mixture.means @ self.a)

    def log_partition(self, mixture, beta):
        """log Z_beta(c) = log E_{p(x|c)}[exp(beta r)] = logsumexp_j(log pi_cj + log f_j), [C]."""
        a, s2 = self.a, mixture.stds ** 2
        log_f = beta * mixture.means @ a + 0.5 * beta ** 2 * s2 * (a @ a)
        return torch.logsumexp(torch.log(mixture.weights) + log_f[None], dim=1)


class QuadraticReward:
    """r(x) = -(gamma/2) |x - m|^2. Callable (samples [B, d], prompts) -> {name: Tensor[B]}."""

    def __init__(self, gamma=1.0, m=(2.0, 0.0), name="quadratic"):
        self.gamma = float(gamma)
        self.m = torch.as_tensor(m, dtype=torch.float64)
        self.name = name

    def __call__(self, samples, prompts=None):
        return {self.name: -0.5 * self.gamma * ((samples - self.m.to(samples)) ** 2).sum(1)}

    def tilt(self, mixture, beta):
        return tilt_quadratic(mixture, self.gamma, self.m, beta)

    def exact_mean(self, mixture):
        """E_{p(x|c)}[r] = -(gamma/2) sum_j pi_cj (|mu_j - m|^2 + d s_j^2), Tensor[C]."""
        d = mixture.means.shape[1]
        per_j = ((mixture.means - self.m) ** 2).sum(1) + d * mixture.stds ** 2
        return -0.5 * self.gamma * mixture.weights @ per_j

    def log_partition(self, mixture, beta):
        """log Z_beta(c) = logsumexp_j(log pi_cj + log f_j), f_j exact (quadratic_log_f)."""
        log_f = quadratic_log_f(mixture, self.gamma, self.m, beta)
        return torch.logsumexp(torch.log(mixture.weights) + log_f[None], dim=1)

# ---------------------------------------------------------------------------------------------
# 2. Image rewards
# ---------------------------------------------------------------------------------------------

# (image rewards go here)

# ---------------------------------------------------------------------------------------------
# 3. Weighted multi-reward
# ---------------------------------------------------------------------------------------------

# (multi-reward goes here)
