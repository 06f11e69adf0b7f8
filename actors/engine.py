"""Engine actor: hosts a model runner and executes plans (it owns GPU memory, nothing else).

Host it on its own thread or process (`Runtime.spawn(..., host="thread"|"process")`): a step
blocks for the duration of the forward, and only this actor's loop waits for it.
"""

from __future__ import annotations

import time

from greenroom.actors.core import Actor, handles
from greenroom.bus.messages import EngineInfo, EngineInfoQuery, Message, StepPlan, StepResult
from greenroom.config import NodeConfig
from greenroom.logging import get_logger

log = get_logger(__name__)


class InjectFault(Message):
    """Fault injection: the engine crashes on its next plan (tests and chaos runs)."""

    reason: str = "injected fault"


class EngineCrashed(RuntimeError):
    pass


class Engine(Actor):
    mailbox_size = 8

    def __init__(self, cfg: NodeConfig | dict, role: str = "mixed"):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, NodeConfig) else _node_config(cfg)
        self.role = role
        self.executor = None
        self._fault: str | None = None

    async def on_start(self) -> None:
        from greenroom.models.executor import PlanExecutor
        from greenroom.models.runner import ModelRunner

        t0 = time.perf_counter()
        runner = ModelRunner(self.cfg.model, self.cfg.kv, self.cfg.model.path)
        self.executor = PlanExecutor(runner, host_blocks=self.cfg.kv.host_blocks)
        log.info(
            "engine ready",
            role=self.role,
            model=runner.model_name,
            device=str(runner.device),
            num_blocks=runner.num_blocks,
            load_s=round(time.perf_counter() - t0, 3),
        )

    @handles(EngineInfoQuery)
    async def info(self, _: EngineInfoQuery) -> EngineInfo:
        r = self.executor.runner
        return EngineInfo(
            num_blocks=r.num_blocks,
            tokens_per_block=r.tokens_per_block,
            max_model_len=r.max_model_len,
            vocab_size=r.vocab_size,
            eos_token_ids=list(r.eos_token_ids),
            device=str(r.device),
            model_name=r.model_name,
        )

    @handles(InjectFault)
    async def inject(self, msg: InjectFault) -> None:
        self._fault = msg.reason

    @handles(StepPlan)
    async def step(self, plan: StepPlan) -> StepResult:
        if self._fault is not None:
            self.crash(EngineCrashed(self._fault))
        return self.executor.execute(plan)


def _node_config(data: dict) -> NodeConfig:
    from greenroom.config import build_config

    return build_config(data)
