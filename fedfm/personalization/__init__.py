"""Personalization: parts of the model that never leave a client (FedPer, FedRep), Ditto, local-only."""

from fedfm.personalization.plan import METHODS, PersonalPlan, build_plan, check_personalization
from fedfm.personalization.trainer import PersonalTrainer

__all__ = ["METHODS", "PersonalPlan", "PersonalTrainer", "build_plan", "check_personalization"]
