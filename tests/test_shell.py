"""Printed command lines can be pasted into a shell and give back the same arguments."""

import shlex

import pytest

from vgtrain.cli.shell import command_line, quote_override


@pytest.mark.parametrize(
    "arg, printed",
    [
        ("data.train_urls=/d/train-{000000..000009}.tar", "data.train_urls='/d/train-{000000..000009}.tar'"),
        ("experiment=custom", "experiment=custom"),
        ("model/mapper=mlp", "model/mapper=mlp"),
        ("data.val_urls=/d/val-000000.tar", "data.val_urls=/d/val-000000.tar"),
        ("+tags=[a, b]", "+tags='[a, b]'"),
        ("prompt=it's", "'prompt=it'\"'\"'s'"),
    ],
)
def test_overrides_are_quoted_as_a_person_types_them(arg, printed):
    assert quote_override(arg) == printed
    assert shlex.split(printed) == [arg]


def test_a_command_line_round_trips_through_the_shell():
    args = ["experiment=custom", "data.train_urls=a/train-{0..3}.tar", "data.use_cached_features=true"]
    assert shlex.split(command_line(*args)) == args
