"""Pure-PyTorch baselines written the way published neural-collapse code computes the metrics.

``published_nc_metrics`` follows Wu & Papyan's ``neural-collapse`` package and the code of Papyan
et al. / Zhu et al.: a first pass for the class means (a per-class loop), a second pass that
forms ``Sigma_W = (X - M[y])^T (X - M[y])`` as a ``D x D`` float64 matrix, the pseudo-inverse of
``Sigma_B``, and the nearest-class-centre decisions from pairwise distances. It is what a user
pastes today; the benchmarks compare pfc_fast against it and the tests check it computes the same
numbers as :mod:`pfc_fast.reference`.
"""
import torch


def published_nc_metrics(feats, labels, num_classes, batch_size=4096):
    """nc1, nc1_quotient, nc2_etf and ncc_accuracy, the published way (float64, D x D)."""
    num_samples, dim = feats.shape
    device = feats.device
    # pass 1: class means
    means = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    for c in range(num_classes):
        means[c] = feats[labels == c].double().mean(0)
    global_mean = means.mean(0)
    # pass 2: within-class covariance, one GEMM per batch, and NCC decisions
    sigma_w = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    correct = 0
    for start in range(0, num_samples, batch_size):
        x = feats[start:start + batch_size].double()
        y = labels[start:start + batch_size]
        centred = x - means[y]
        sigma_w += centred.T @ centred
        correct += int((torch.cdist(x, means).argmin(1) == y).sum())
    sigma_w /= num_samples
    m = means - global_mean
    sigma_b = m.T @ m / num_classes
    nc1 = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, rtol=1e-10, hermitian=True)) / num_classes
    gram = m @ m.T
    etf = (torch.eye(num_classes, dtype=torch.float64, device=device) - 1.0 / num_classes) / (num_classes - 1) ** 0.5
    return {
        "nc1": float(nc1),
        "nc1_quotient": float(torch.trace(sigma_w) / torch.trace(sigma_b)),
        "nc2_etf": float(torch.linalg.norm(gram / torch.linalg.norm(gram) - etf)),
        "ncc_accuracy": correct / num_samples,
    }
