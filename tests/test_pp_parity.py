"""Pipeline stages hold their layers only and chain to the whole model's greedy tokens:
PP 2 (even) and PP 3 (uneven, the last stage with fewer layers) equal PP 1 and
transformers, with chunked prefill and prefix reuse; layer splits are checked."""

from __future__ import annotations

import pytest
from pp_stages import InProcessPipeline
from tiny_checkpoints import save_checkpoint, transformers_greedy
from tp_ranks import NEW_TOKENS, make_runner, request_prompts, serve_greedy

from greenroom.config import build_config
from greenroom.parallel.stages import split_layers

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=211,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return save_checkpoint(config, tmp_path_factory.mktemp("pp") / "llama5", seed=5)


def test_split_layers_even_uneven_and_refused() -> None:
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(5, 3, [2, 2, 1]) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ValueError, match="more stages than"):
        split_layers(2, 3)
    with pytest.raises(ValueError, match="summing to the model's 5 layers"):
        split_layers(5, 2, [2, 2])
    with pytest.raises(ValueError, match="pp_layers"):
        build_config({"parallel": {"pp_size": 2, "pp_layers": [1, 1, 1]}})
    with pytest.raises(ValueError, match="sm_disagg.enabled with .*pp_size = 2"):
        build_config({"parallel": {"pp_size": 2}, "sm_disagg": {"enabled": True}})


@pytest.mark.parametrize("pp_size,pp_layers", [(2, ()), (3, (2, 2, 1))])
def test_stages_give_the_whole_models_greedy_tokens(checkpoint, pp_size, pp_layers) -> None:
    whole = make_runner(checkpoint)
    prompts = request_prompts(whole.vocab_size)
    expected = serve_greedy(whole, prompts)
    pipe = InProcessPipeline(checkpoint, pp_size, pp_layers)
    layers = [len(ex.runner.model.weights.layers) for ex in pipe.stages]
    assert layers == (list(pp_layers) or [3, 2])
    assert pipe.stages[0].runner.kv_pool.shape[1] == layers[0]  # the KV pool of its layers
    assert pipe.stages[-1].runner.model.weights.embed is None
    assert pipe.stages[0].runner.model.weights.lm_head is None
    got = serve_greedy(pipe.runner, prompts, executor=pipe)
    assert got == expected
    hf = transformers_greedy(checkpoint, [prompts[0], prompts[1]], NEW_TOKENS)
    assert got[:2] == hf
