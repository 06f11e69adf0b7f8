"""The OpenAI-compatible HTTP API against a real node: the official openai SDK as the client,
raw httpx for SSE framing, errors, disconnects, /health and /metrics."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from http_fixtures import NodeThread, chat_model_dir, start_http
from prometheus_client.parser import text_string_to_metric_families

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient
from greenroom.http.text import TextCodec

pytestmark = pytest.mark.slow

PROMPT_IDS = [1, 45, 300, 12, 77, 401, 9, 250]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = chat_model_dir(tmp_path_factory.mktemp("http") / "chat-model")
    node = NodeThread({"kv.num_blocks": 256, "model.path": str(model_dir)})
    try:
        server = start_http(node.node, str(model_dir), workers=2)
    except BaseException:
        node.stop()
        raise
    try:
        yield node, server, model_dir
    finally:
        server.stop()
        node.stop()


@pytest.fixture(scope="module")
def sdk(served):
    _, server, _ = served
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(served):
    _, server, _ = served
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def native(node: NodeThread, prompt_ids: list[int], **sampling):
    async def go():
        async with AsyncClient(node.node.address, timeout=60) as c:
            return await c.generate(prompt_ids, SamplingParams(**sampling))

    return node.call(go())


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[len("data: ") :] for f in frames]


def test_models_lists_the_served_model(sdk) -> None:
    models = sdk.models.list().data
    assert [m.id for m in models] == ["chat-model"]


def test_completion_greedy_tokens_equal_the_native_client(served, sdk) -> None:
    node, _, _ = served
    want = native(node, PROMPT_IDS, max_tokens=12, ignore_eos=True)
    got = sdk.completions.create(
        model="chat-model",
        prompt=PROMPT_IDS,
        max_tokens=12,
        temperature=0,
        user="someone",
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choice = got.choices[0]
    assert choice.model_extra["token_ids"] == want.token_ids
    assert choice.text == want.text
    assert choice.finish_reason == "length"
    assert got.usage.prompt_tokens == len(PROMPT_IDS)
    assert got.usage.completion_tokens == 12
    # a text prompt is tokenized as the node tokenizes it (BOS added by the tokenizer)
    text = sdk.completions.create(
        model="chat-model", prompt="Hello, how", max_tokens=6, temperature=0
    )
    by_node = native(node, TextCodec.load(str(served[2])).encode("Hello, how"), max_tokens=6)
    assert text.choices[0].text == by_node.text


def test_streaming_completion_joins_to_the_full_text(sdk) -> None:
    kw = dict(model="chat-model", prompt="The quick brown", max_tokens=10, temperature=0)
    full = sdk.completions.create(**kw, extra_body={"ignore_eos": True})
    stream = sdk.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_greedy_equals_native_on_the_template_rendering(served, sdk) -> None:
    node, _, model_dir = served
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    ids = AutoTokenizer.from_pretrained(str(model_dir)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    want = native(node, list(ids), max_tokens=8, ignore_eos=True)
    got = sdk.chat.completions.create(
        model="chat-model",
        messages=messages,
        max_completion_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert got.choices[0].model_extra["token_ids"] == want.token_ids
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(ids)
    stream = sdk.chat.completions.create(
        model="chat-model",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[-1].usage.completion_tokens == 8


def test_n_choices_equal_the_native_samples(served, sdk) -> None:
    node, _, _ = served
    got = sdk.completions.create(
        model="chat-model",
        prompt=PROMPT_IDS,
        n=3,
        max_tokens=6,
        temperature=1.0,
        seed=100,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert sorted(c.index for c in got.choices) == [0, 1, 2]
    want = native(node, PROMPT_IDS, max_tokens=6, temperature=1.0, seed=100, n=3, ignore_eos=True)
    for c in got.choices:
        assert c.model_extra["token_ids"] == want[c.index].token_ids
    assert got.usage.completion_tokens == 18
    stream = sdk.chat.completions.create(
        model="chat-model",
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        max_tokens=4,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_strings_cut_the_text_and_stop_ids_end_the_output(sdk) -> None:
    kw = dict(model="chat-model", prompt="Hello, how", max_tokens=24, temperature=0)
    full = sdk.completions.create(**kw, extra_body={"ignore_eos": True, "return_token_ids": True})
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop and len(text) > 4, text
    cut = sdk.completions.create(
        **kw, stop=[stop, "never-in-output"], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = sdk.completions.create(**kw, stop=stop, stream=True, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    ids = full.choices[0].model_extra["token_ids"]
    by_id = sdk.completions.create(
        **kw, extra_body={"stop_token_ids": [ids[5]], "return_token_ids": True}
    )
    out = by_id.choices[0].model_extra["token_ids"]
    assert out == ids[: ids.index(ids[5]) + 1] and by_id.choices[0].finish_reason == "stop"


def test_logprobs_match_the_native_client(served, sdk) -> None:
    node, _, _ = served
    want = native(node, PROMPT_IDS, max_tokens=5, logprobs=3, ignore_eos=True)
    got = sdk.completions.create(
        model="chat-model",
        prompt=PROMPT_IDS,
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x.token_logprob for x in want.logprobs])
    assert len(lp.tokens) == 5 and all(len(t) >= 1 for t in lp.top_logprobs)
    chat = sdk.chat.completions.create(
        model="chat-model",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_sse_framing_done_and_usage_chunk(http) -> None:
    r = http.post(
        "/v1/completions",
        json={
            "prompt": PROMPT_IDS,
            "max_tokens": 5,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    assert all(b["object"] == "text_completion" for b in bodies)
    assert all(b["usage"] is None for b in bodies[:-1])
    assert bodies[-1]["choices"] == []
    assert bodies[-1]["usage"] == {
        "prompt_tokens": len(PROMPT_IDS),
        "completion_tokens": 5,
        "total_tokens": len(PROMPT_IDS) + 5,
        "prompt_tokens_details": {
            "cached_tokens": bodies[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]
        },
    }
    # without include_usage there is no usage field and no usage chunk
    r = http.post("/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 3, "stream": True})
    bodies = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all("usage" not in b and b["choices"] for b in bodies)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", {"prompt": PROMPT_IDS, "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/completions", {"prompt": [], "max_tokens": 3}, 400, "prompt"),
        ("/v1/completions", {"prompt": PROMPT_IDS, "max_tokens": 0}, 400, None),
        ("/v1/completions", {"prompt": PROMPT_IDS, "max_tokens": 5000}, 400, None),
        ("/v1/completions", {"prompt": [1, 99999], "max_tokens": 3}, 400, None),
        ("/v1/completions", {"prompt": PROMPT_IDS, "temperature": -1}, 400, None),
        ("/v1/completions", {"prompt": PROMPT_IDS, "n": 0}, 400, "n"),
        ("/v1/completions", {"prompt": PROMPT_IDS, "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {"prompt": PROMPT_IDS, "echo": True}, 400, "echo"),
        ("/v1/completions", {"prompt": PROMPT_IDS, "model": "other"}, 404, "model"),
        ("/v1/completions", {"prompt": PROMPT_IDS, "stop": [""]}, 400, "stop"),
        ("/v1/completions", {"prompt": PROMPT_IDS, "stream": True, "max_tokens": 0}, 400, None),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
        ("/v1/nothing", {}, 404, None),
    ],
)
def test_errors_are_openai_error_objects(http, path, body, status, param) -> None:
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == status
    if param is not None:
        assert err["param"] == param


def test_sdk_raises_typed_errors(sdk) -> None:
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        sdk.completions.create(model="chat-model", prompt=PROMPT_IDS, max_tokens=4000)
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="gpt-4", prompt=PROMPT_IDS, max_tokens=2)


def test_client_disconnect_aborts_and_frees_blocks(served, http) -> None:
    node, server, _ = served
    body = {"prompt": PROMPT_IDS, "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
    free = node.call(node.node.wait_blocks_free(timeout=10))
    assert free.free_blocks == free.total_blocks
    # a non-streaming request whose client goes away is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    free = node.call(node.node.wait_blocks_free(timeout=10))
    assert free.free_blocks == free.total_blocks


def scrape(http) -> dict[tuple[str, tuple], float]:
    r = http.get("/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_the_requests_sent(served, http) -> None:
    model = (("model_name", "chat-model"),)
    LONG = list(range(100, 140))  # two full KV blocks: the second request reuses them
    before = scrape(http)

    def delta(name: str, labels: tuple = model) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    for max_tokens in (3, 4):
        r = http.post(
            "/v1/completions",
            json={"prompt": LONG, "max_tokens": max_tokens, "ignore_eos": True},
        )
        assert r.status_code == 200
    r = http.post(
        "/v1/completions",
        json={"prompt": LONG, "max_tokens": 4, "stop_token_ids": list(range(512))},
    )
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    r = http.post("/v1/completions", json={"prompt": LONG, "max_tokens": 0})
    assert r.status_code == 400
    served[0].call(served[0].node.wait_blocks_free(timeout=10))
    after = scrape(http)
    length = (*model, ("finished_reason", "length"))
    stop = (*model, ("finished_reason", "stop"))
    assert delta("greenroom:request_success_total", tuple(sorted(length))) == 2
    assert delta("greenroom:request_success_total", tuple(sorted(stop))) == 1
    assert delta("greenroom:generation_tokens_total") == 3 + 4 + 1
    assert delta("greenroom:prompt_tokens_total") == 3 * len(LONG)
    for hist in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert delta(f"greenroom:{hist}_count") == 3
    assert delta("greenroom:inter_token_latency_seconds_count") == 2 + 3
    assert after[("greenroom:num_requests_running", model)] == 0
    assert after[("greenroom:kv_cache_usage_perc", model)] == 0
    assert delta("greenroom:prefix_cache_queries_total") > 0
    assert delta("greenroom:prefix_cache_hits_total") >= 2 * 16  # the same prompt, again


def test_health_is_200_on_a_live_node(http) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/health").status_code == 200


def test_no_tokenizer_and_no_template_are_clear_400s(served) -> None:
    node, _, _ = served
    bare = start_http(node.node, None)
    try:
        with httpx.Client(base_url=bare.url, timeout=30) as c:
            r = c.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
            )
            assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
            r = c.post("/v1/completions", json={"prompt": "text", "max_tokens": 2})
            assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
            r = c.post("/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 2})
            assert r.status_code == 200  # token-id prompts need no tokenizer here
    finally:
        bare.stop()


def test_overload_timeout_and_a_dead_node(tmp_path) -> None:
    node = NodeThread(
        {
            "kv.num_blocks": 256,
            "scheduler.max_num_active_requests": 1,
            "scheduler.max_queue_size": 1,
            "scheduler.request_timeout_s": 1.0,
        }
    )
    server = start_http(node.node, None, health_timeout_s=1.0, request_timeout_s=3.0)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/health").status_code == 200
            body = {"prompt": PROMPT_IDS, "max_tokens": 1900, "ignore_eos": True}
            statuses: list[int] = []

            def send() -> None:
                statuses.append(c.post("/v1/completions", json=body).status_code)

            threads = [threading.Thread(target=send) for _ in range(4)]
            for t in threads:
                t.start()
                time.sleep(0.05)
            for t in threads:
                t.join()
            assert 503 in statuses  # overloaded (queue full)
            assert 504 in statuses  # timed out (request_timeout_s)
            node.stop()
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
            r = c.post("/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 2})
            assert r.status_code in (503, 504)
    finally:
        server.stop()
        node.stop()
