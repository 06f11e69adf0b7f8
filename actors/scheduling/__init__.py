"""The scheduler's pure core: request state, budgets, plan building (no I/O)."""

from greenroom.actors.scheduling.budget import FlowBudget
from greenroom.actors.scheduling.core import SchedulerCore
from greenroom.actors.scheduling.request import Request, RequestState

__all__ = ["FlowBudget", "Request", "RequestState", "SchedulerCore"]
