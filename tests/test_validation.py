"""Server-side reply validation for every method, including property-based malformed updates."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from fedrank.methods import METHODS, Task
from fedrank.validation import check_reply

from test_methods import R, make, train_stub

HEAD = {"classifier.weight": torch.zeros(3, 4), "classifier.bias": torch.zeros(3)}


def good_upload(name: str, rank: int, rnd: int = 1, client: int = 0):
    method = make(name)
    task = Task(client, rank, rnd)
    state = method.init_state()
    start = method.local_start(method.payload(state, task), task)
    return method, task, method.upload(start, train_stub(start, task), task)


def head_like():
    return {k: torch.randn_like(v) for k, v in HEAD.items()}


@pytest.mark.parametrize("name", list(METHODS))
def test_a_well_formed_upload_passes_unchanged(name: str) -> None:
    rank = R if name == "fedit" else 3
    method, task, upload = good_upload(name, rank)
    out = check_reply(method, task, upload, head_like(), HEAD)
    assert not isinstance(out, str), out
    for k, t in upload.items():
        assert torch.equal(out[0][k], t)


MUTATIONS = ["drop_key", "extra_key", "wrong_rank", "nan", "inf", "head_shape", "transpose"]


def mutate(upload: dict, kind: str, key_index: int) -> tuple[dict, dict]:
    keys = sorted(k for k, t in upload.items() if t.is_floating_point())
    key = keys[key_index % len(keys)]
    up, head = dict(upload), head_like()
    if kind == "drop_key":
        del up[key]
    elif kind == "extra_key":
        up["intruder#A"] = torch.zeros(1, 1)
    elif kind == "wrong_rank":
        t = up[key]
        up[key] = torch.zeros(t.shape[0] + 1, t.shape[1]) if key.endswith("#A") else torch.zeros(t.shape[0], t.shape[1] + 1)
    elif kind == "nan":
        up[key] = up[key].clone().view(-1).index_fill(0, torch.tensor([0]), float("nan")).view_as(up[key])
    elif kind == "inf":
        up[key] = up[key] * float("inf")
    elif kind == "head_shape":
        head["classifier.weight"] = torch.zeros(4, 4)
    elif kind == "transpose":
        up[key] = up[key].T.contiguous() if up[key].shape[0] != up[key].shape[1] else up[key][:, :-1]
    return up, head


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(list(METHODS)), kind=st.sampled_from(MUTATIONS), key_index=st.integers(0, 50),
       rank=st.integers(1, R))
def test_malformed_updates_are_rejected_with_a_reason(name: str, kind: str, key_index: int, rank: int) -> None:
    rank = R if name == "fedit" else rank
    method, task, upload = good_upload(name, rank)
    bad, head = mutate(upload, kind, key_index)
    out = check_reply(method, task, bad, head, HEAD)
    assert isinstance(out, str) and out


def test_fedplora_slots_must_be_the_clients_own_selection() -> None:
    method, task, upload = good_upload("fedplora", 3)
    upload["slots"] = (upload["slots"] + 1) % R
    assert "slots" in check_reply(method, task, upload, head_like(), HEAD)


def test_norm_bound_clips_or_rejects() -> None:
    method, task, upload = good_upload("replication", 4)
    norm = torch.sqrt(sum(t.double().square().sum() for t in upload.values()))
    clipped, _ = check_reply(method, task, upload, head_like(), HEAD, max_norm=float(norm) / 2)
    new_norm = torch.sqrt(sum(t.double().square().sum() for t in clipped.values()))
    assert float(new_norm) == pytest.approx(float(norm) / 2, rel=1e-5)
    assert "exceeds" in check_reply(method, task, upload, head_like(), HEAD, max_norm=float(norm) / 2, clip=False)
    untouched, _ = check_reply(method, task, upload, head_like(), HEAD, max_norm=float(norm) * 2)
    assert all(torch.equal(untouched[k], upload[k]) for k in upload)
