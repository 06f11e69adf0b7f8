"""n > 1 in SchedulerCore: samples after the first wait for its prompt, then reuse its blocks;
a group is cancelled as one; a frontend stop (stop string) finishes one sample."""

from __future__ import annotations

import pytest
from scheduling_sim import Sim, expected_output, mixed, prompt, two_flows

from greenroom.bus.messages import OutputBatch, sample_request_id


class SampleSim(Sim):
    """Records deltas per (client id, sample index)."""

    def record(self, out: OutputBatch) -> None:
        for d in out.deltas:
            key = f"{d.request_id}/{d.index}"
            assert key not in self.final, f"{key}: tokens after its end"
            self.tokens[key].extend(d.token_ids)
            if d.finish_reason is not None:
                self.final[key] = d.finish_reason
                assert d.metrics.num_output_tokens == len(self.tokens[key])
        for e in out.errors:
            self.final[f"{e.request_id}/err"] = f"error:{e.kind}"


@pytest.mark.parametrize("flows", [mixed(tokens=16, batch=4), two_flows()])
def test_samples_wait_for_the_first_prompt_then_reuse_its_blocks(flows) -> None:
    sim = SampleSim(flows, tpb=4)
    p = prompt(1, 37)
    sim.submit("g", p, max_tokens=5, ignore_eos=True, n=3, seed=10)
    sim.submit("solo", prompt(2, 9), max_tokens=5, ignore_eos=True)
    sim.run()
    sim.drained()
    news = {}
    for plan in sim.plans:
        for n in plan.new:
            news.setdefault(n.request_id, n)  # the first engine to see it
    ids = [sample_request_id("g", i, 3) for i in range(3)]
    assert news[ids[0]].num_cached_tokens == 0
    assert [news[i].num_cached_tokens for i in ids[1:]] == [36, 36]  # all but the last token
    assert [news[i].sampling.seed for i in ids] == [10, 11, 12]
    assert all(news[i].sampling.n == 1 for i in ids)
    for i, rid in enumerate(ids):
        sp = news[rid].sampling
        assert (sim.tokens[f"g/{i}"], sim.final[f"g/{i}"]) == expected_output(
            rid, 37, sp, sim.vocab, sim.max_model_len
        )
    assert sim.final["solo/0"] == "length"


def test_a_group_is_cancelled_as_one_even_while_samples_are_held() -> None:
    sim = SampleSim(mixed(tokens=8, batch=4), tpb=4)
    sim.submit("g", prompt(3, 30), max_tokens=50, ignore_eos=True, n=4)
    sim.iterate("mixed")  # the first sample's first prefill chunk; the others wait
    assert sim.core.num_waiting == 0 and sim.core.num_active == 1
    sim.cancel(["g"])
    assert [sim.final[f"g/{i}"] for i in range(4)] == ["abort"] * 4
    sim.run()
    sim.drained()
    sim.final.clear()
    sim.tokens.clear()
    sim.submit("g", prompt(3, 30), max_tokens=2, ignore_eos=True, n=2)  # the id is free again
    sim.run()
    assert sim.final == {"g/0": "length", "g/1": "length"}
    sim.drained()


def test_a_stop_from_the_frontend_finishes_one_sample() -> None:
    sim = SampleSim(mixed(), tpb=4)
    sim.submit("g", prompt(4, 10), max_tokens=30, ignore_eos=True, n=2)
    for _ in range(6):
        sim.iterate("mixed")
    sim.cancel([sample_request_id("g", 1, 2)], reason="stop")
    assert sim.final["g/1"] == "stop"
    sim.run()
    sim.drained()
    assert sim.final["g/0"] == "length" and len(sim.tokens["g/0"]) == 30
