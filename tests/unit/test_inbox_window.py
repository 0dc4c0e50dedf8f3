"""A worker's inbox keeps only what its schedule can have in flight: the current step's and
the next one's messages, at most as many as those steps' micro-batches from each sender."""

from __future__ import annotations

import asyncio

import pytest
import torch

from opdag.errors import CodecError
from worker.inbox import STEPS_AHEAD, Inbox
from worker.transfer_kind import TransferKind

FORWARD = TransferKind.FORWARD
BACKWARD = TransferKind.BACKWARD
VALUES = {"h": torch.zeros(2)}


def test_messages_for_the_current_and_next_step_are_kept() -> None:
    async def go() -> None:
        step = 3
        inbox = Inbox(current_step=lambda: step, micro_batches=2, senders=1)
        await inbox.put(FORWARD, 3, 0, 0, VALUES)
        await inbox.put(FORWARD, 4, 1, 0, VALUES)
        assert STEPS_AHEAD == 1
        assert (await inbox.take(FORWARD, 3, 0, {0}))[0] is VALUES
        step = 4
        assert (await inbox.take(FORWARD, 4, 1, {0}))[0] is VALUES
        assert len(inbox) == 0

    asyncio.run(go())


def test_a_message_for_a_far_future_step_is_refused() -> None:
    async def go() -> None:
        inbox = Inbox(current_step=lambda: 3, micro_batches=2, senders=1)
        with pytest.raises(CodecError) as info:
            await inbox.put(FORWARD, 5, 0, 0, VALUES)
        assert str(info.value) == (
            "values of step 5 from stage 0 arrived while this stage runs step 3: it "
            "keeps messages for steps 3 to 4 only (its schedule's in-flight window)"
        )
        with pytest.raises(CodecError):
            await inbox.put(BACKWARD, 10**9, 0, 2, VALUES)
        assert len(inbox) == 0

    asyncio.run(go())


def test_messages_past_the_depth_of_the_window_are_refused() -> None:
    async def go() -> None:
        # Two steps of 2 micro-batches from 2 senders: 8 messages at most.
        inbox = Inbox(current_step=lambda: 0, micro_batches=2, senders=2)
        assert inbox.depth == 8
        for i in range(8):
            await inbox.put(FORWARD if i % 2 else BACKWARD, i // 4, i % 4 // 2, 7, VALUES)
        with pytest.raises(CodecError) as info:
            await inbox.put(FORWARD, 1, 9, 1, VALUES)
        assert str(info.value) == (
            "values of step 1 from stage 1 refused: this stage holds 8 messages, all "
            "its schedule can have in flight"
        )
        await inbox.take(BACKWARD, 0, 0, {7})
        await inbox.put(FORWARD, 1, 9, 1, VALUES)  # a slot came free

    asyncio.run(go())


def test_a_message_given_twice_is_still_refused() -> None:
    async def go() -> None:
        inbox = Inbox(current_step=lambda: 0, micro_batches=1, senders=1)
        await inbox.put(FORWARD, 0, 0, 0, VALUES)
        with pytest.raises(CodecError, match="arrived twice"):
            await inbox.put(FORWARD, 0, 0, 0, VALUES)

    asyncio.run(go())
