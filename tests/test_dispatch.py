"""What runs next: the one decision of farm.tasks.dispatch, as plain data; and what a send
the broker refuses leaves (against the real Redis)."""

from __future__ import annotations

import re

from pydantic import SecretStr

from farm.tasks.app import configure
from farm.tasks.dispatch import BrokerSender, InlineSender, Next, plan, send_or_leave


def test_a_next_stage_on_the_workers_own_queue_continues_there() -> None:
    assert plan("img2img", ["encode"], serves="gpu") == Next("encode", ())


def test_a_next_stage_on_another_queue_is_sent() -> None:
    assert plan("img2img", ["postprocess"], serves="gpu") == Next(None, ("postprocess",))
    assert plan("img2img", ["encode"], serves=None) == Next(None, ("encode",))


def test_of_several_ready_stages_one_continues_and_the_rest_go_to_other_workers() -> None:
    # Two stages ready at once on the worker's queue (parallel branches of a DAG): continuing
    # both here would serialise branches that other workers of the queue could run meanwhile.
    assert plan("img2img", ["encode", "noise"], serves="gpu") == Next("encode", ("noise",))


def test_the_inline_sender_keeps_the_order_stages_became_ready() -> None:
    sender = InlineSender()
    sender.send("job", "img2img", ["encode", "noise"], 5, countdown=3)
    sender.send("job", "img2img", ["denoise"], 5)
    assert list(sender.pending) == ["encode", "noise", "denoise"]


def test_a_send_whose_login_the_broker_refuses_is_left_to_the_reconciler(settings) -> None:
    wrong = re.sub(r"(://:)[^@]*@", r"\1wrong@", settings.broker_url.get_secret_value())
    try:
        configure(settings.model_copy(update={"broker_url": SecretStr(wrong)}))
        assert not send_or_leave(BrokerSender(), "job", "img2img", ["preprocess"], 5)
    finally:
        configure(settings)
