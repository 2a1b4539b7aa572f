"""The local stack's hold on its data folder: a second stack is refused and cleans up nothing."""

from __future__ import annotations

import pytest

from formcall_dev.stack import STATE_FILE, Stack, StackBusy


def test_a_second_stack_on_the_same_folder_is_refused_and_removes_nothing(tmp_path):
    first = Stack(tmp_path)
    first.lock()
    (tmp_path / STATE_FILE).write_text("{}")  # the running stack's state

    second = Stack(tmp_path)
    with pytest.raises(StackBusy, match="already running"):
        second.lock()
    second.stop()

    assert (tmp_path / STATE_FILE).read_text() == "{}"
    first.stop()
    assert not (tmp_path / STATE_FILE).exists()


def test_the_folder_is_free_again_once_its_stack_stopped(tmp_path):
    first = Stack(tmp_path)
    first.lock()
    first.stop()

    again = Stack(tmp_path)
    again.lock()
    again.stop()


def test_stacks_on_different_folders_do_not_collide(tmp_path):
    one, other = Stack(tmp_path / "one"), Stack(tmp_path / "other")
    one.lock()
    other.lock()
    one.stop()
    other.stop()
