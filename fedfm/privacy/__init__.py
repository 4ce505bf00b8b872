"""Privacy: client-level DP (DP-FedAvg with adaptive clipping), local DP-SGD, their accountants."""

from fedfm.privacy.accountant import PrivacyAccountant, compute_epsilon, noise_multiplier_for
from fedfm.privacy.client_dp import ClientDPFold, clip_by_global_norm, global_norm, with_client_dp
from fedfm.privacy.dp_sgd import LocalDPSGD, PerExampleGradients, SampleLevelAccountant, calibrate_noise_multiplier

__all__ = [
    "ClientDPFold",
    "LocalDPSGD",
    "PerExampleGradients",
    "PrivacyAccountant",
    "SampleLevelAccountant",
    "calibrate_noise_multiplier",
    "clip_by_global_norm",
    "compute_epsilon",
    "global_norm",
    "noise_multiplier_for",
    "with_client_dp",
]
