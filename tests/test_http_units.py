"""HTTP server pieces without a node: prompts, bodies, sampling and error mapping."""

from __future__ import annotations

import pytest

from greenroom.client import Overloaded, RequestFailed, RequestRejected, RequestTimeout
from greenroom.http.errors import ApiError, from_greenroom
from greenroom.http.generation import prompt_jobs, sampling_params
from greenroom.http.protocol import ChatRequest, CompletionRequest, decode_body, prompt_list


def test_prompt_forms() -> None:
    assert prompt_list("hi") == ["hi"]
    assert prompt_list([1, 2]) == [[1, 2]]
    assert prompt_list(["a", [3]]) == ["a", [3]]
    for bad in ([], [[]], 5, [1, "a"], None):
        with pytest.raises(ApiError):
            prompt_list(bad)


def test_bodies_ignore_unknown_fields_and_name_bad_ones() -> None:
    req = decode_body(b'{"prompt": "x", "user": "u", "some_new_field": 1}', CompletionRequest)
    assert req.prompt == "x" and req.max_tokens == 16
    with pytest.raises(ApiError) as err:
        decode_body(b'{"messages": [], "n": "two"}', ChatRequest)
    assert err.value.status == 400 and err.value.param == "n"


def test_sampling_mapping_and_derived_seeds() -> None:
    req = decode_body(
        b'{"prompt": "x", "temperature": 0.5, "top_p": 0.9, "seed": 7, "n": 3, "stop_token_ids": [5]}',
        CompletionRequest,
    )
    s = sampling_params(req, 10, 2)
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop_token_ids, s.logprobs, s.n) == (
        10, 0.5, 0.9, 7, [5], 2, 3,
    )  # fmt: skip
    jobs = prompt_jobs([[1], [2]], s)  # choice p * n + i is sample i of prompt p
    assert [(j.first_index, j.prompt_ids) for j in jobs] == [(0, [1]), (3, [2])]
    pen = decode_body(
        b'{"prompt": "x", "presence_penalty": 0.5, "logit_bias": {"7": -100}, "stop": "END"}',
        CompletionRequest,
    )
    s = sampling_params(pen, 4, 0)
    assert (s.presence_penalty, s.logit_bias, s.stop) == (0.5, {7: -100.0}, ["END"])
    default = sampling_params(decode_body(b'{"prompt": "x"}', CompletionRequest), 16, 0)
    assert default.temperature == 1.0  # OpenAI's default, not greedy


def test_error_kinds_map_to_status_codes() -> None:
    assert from_greenroom(RequestRejected("bad")).status == 400
    assert from_greenroom(Overloaded("busy")).status == 503
    assert from_greenroom(RequestTimeout("slow")).status == 504
    assert from_greenroom(RequestFailed("boom")).status == 500
    body = from_greenroom(Overloaded("busy")).body()["error"]
    assert body == {"message": "busy", "type": "service_unavailable", "param": None, "code": 503}
