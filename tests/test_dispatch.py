"""What runs next: the one decision of farm.tasks.dispatch, as plain data; and what a send
the broker refuses leaves (against the real Redis)."""

from __future__ import annotations

import re

from pydantic import SecretStr

from farm.builtin import IMG2IMG
from farm.tasks.app import configure
from farm.tasks.dispatch import BrokerSender, InlineSender, Next, plan, send_or_leave

ENCODE, NOISE, DENOISE = (IMG2IMG.stage(name) for name in ("encode", "noise", "denoise"))
PREPROCESS, POSTPROCESS = IMG2IMG.stage("preprocess"), IMG2IMG.stage("postprocess")


def test_a_next_stage_on_the_workers_own_queue_continues_there() -> None:
    assert plan([ENCODE], serves="gpu") == Next(ENCODE, ())


def test_a_next_stage_on_another_queue_is_sent() -> None:
    assert plan([POSTPROCESS], serves="gpu") == Next(None, (POSTPROCESS,))
    assert plan([ENCODE], serves=None) == Next(None, (ENCODE,))


def test_of_several_ready_stages_one_continues_and_the_rest_go_to_other_workers() -> None:
    # Two stages ready at once on the worker's queue (parallel branches of a DAG): continuing
    # both here would serialise branches that other workers of the queue could run meanwhile.
    assert plan([ENCODE, NOISE], serves="gpu") == Next(ENCODE, (NOISE,))


def test_the_inline_sender_keeps_the_order_stages_became_ready() -> None:
    sender = InlineSender()
    sender.send("job", [ENCODE, NOISE], 5, countdown=3)
    sender.send("job", [DENOISE], 5)
    assert list(sender.pending) == ["encode", "noise", "denoise"]


def test_a_send_whose_login_the_broker_refuses_is_left_to_the_reconciler(settings) -> None:
    wrong = re.sub(r"(://:)[^@]*@", r"\1wrong@", settings.broker_url.get_secret_value())
    try:
        configure(settings.model_copy(update={"broker_url": SecretStr(wrong)}))
        assert not send_or_leave(BrokerSender(), "job", [PREPROCESS], 5)
    finally:
        configure(settings)
