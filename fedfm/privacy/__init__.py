"""Privacy: client-level DP (DP-FedAvg with adaptive clipping) and its accountant."""

from fedfm.privacy.accountant import PrivacyAccountant, compute_epsilon, noise_multiplier_for
from fedfm.privacy.client_dp import ClientDPFold, clip_by_global_norm, global_norm, with_client_dp

__all__ = [
    "ClientDPFold",
    "PrivacyAccountant",
    "clip_by_global_norm",
    "compute_epsilon",
    "global_norm",
    "noise_multiplier_for",
    "with_client_dp",
]
