"""The fault suite, bounded: each scenario of tests/faultkit.py with few rounds
(``python bench/faults.py`` runs the same ones longer and prints the table)."""

from __future__ import annotations

import random
import re

import pytest

from tests import faultkit


def test_kill9_of_the_broker_under_keyed_load_loses_and_doubles_nothing(tmp_path):
    row = faultkit.kill9_under_load(tmp_path, rounds=4, rng=random.Random(1))
    assert row.acknowledged > 100, "the clients barely ran"
    assert (row.lost, row.duplicated, row.broken) == (0, 0, 0), row


@pytest.mark.parametrize("point", list(faultkit.FAILPOINTS))
def test_a_crash_at_a_failpoint_loses_nothing_acknowledged(tmp_path, point):
    row = faultkit.failpoint_crash(tmp_path, point, rounds=1, rng=random.Random(2))
    assert row.detected == "fired 1/1", row
    assert row.acknowledged > 0 and (row.lost, row.duplicated, row.broken) == (0, 0, 0), row


def test_power_loss_loses_nothing_acknowledged_and_would_see_it_if_it_did(tmp_path):
    synced = faultkit.power_loss(tmp_path, rounds=1, rng=random.Random(3))
    assert synced.acknowledged > 50 and (synced.lost, synced.duplicated) == (0, 0), synced
    unsynced = faultkit.power_loss(tmp_path, rounds=1, rng=random.Random(3), sync=False)
    assert unsynced.acknowledged > 50 and unsynced.lost > 0, "the check cannot fail"


@pytest.mark.parametrize("fault", ["kill9", "sigstop", "broker"])
def test_node_and_broker_faults_complete_every_job_once(tmp_path, fault):
    row = faultkit.node_faults(tmp_path, fault, jobs=8, rng=random.Random(4))
    assert row.acknowledged == 8 and (row.lost, row.duplicated, row.crashes) == (0, 0, 0), row


def test_fuzzed_frames_crash_nothing(tmp_path):
    rows = faultkit.fuzz(tmp_path, frames=2000, rng=random.Random(5))
    assert [(r.crashes, r.broken) for r in rows] == [(0, 0), (0, 0)], rows


def test_hostile_queries_are_stopped_and_the_broker_stays_small(tmp_path):
    rows = faultkit.hostile_queries(tmp_path, rng=random.Random(7))
    assert [(r.crashes, r.broken) for r in rows] == [(0, 0), (0, 0)], rows
    assert "passed 128 MiB" in rows[0].detected and "3 s time limit" in rows[1].detected, rows


def test_random_corruptions_give_a_valid_prefix_or_a_named_error(tmp_path):
    row = faultkit.corruptions(tmp_path, rounds=40, rng=random.Random(6))
    assert (row.crashes, row.broken) == (0, 0), row
    named, prefixes = map(int, re.findall(r"\d+", row.detected))
    assert named + prefixes == 40 and named > 0, row
