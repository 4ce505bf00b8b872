"""Personalization: parts of the model that never leave a client (FedPer, FedRep), Ditto, local-only.

The plan (which tensors are personal) lives here; the client-side training
with it is :class:`fedfm.client.personal.PersonalTrainer`.
"""

from fedfm.personalization.plan import METHODS, PersonalPlan, build_plan, check_personalization

__all__ = ["METHODS", "PersonalPlan", "build_plan", "check_personalization"]
