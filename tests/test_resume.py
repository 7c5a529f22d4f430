"""A pipeline killed in any stage resumes: the rerun skips what was finished, redoes (or, for
training, continues) what was not, and no half-written ``quantized/`` or ``publish/`` is ever
left where a user or a later stage would read it.

One tiny run dir goes through the whole chain (``resume_chain`` in tests/conftest.py), each
process killed with SIGKILL inside the next stage (tests/kill_runner.py) and the next one
rerunning it with ``run_dir=``: killed in training, then in quantize, in evaluate, in
publish, then left to finish. Each test below checks one kill and the rerun after it.
"""

from __future__ import annotations

import signal

import pytest

from tests.test_pipeline import DEFAULT_METHODS, check_run_dir


@pytest.fixture(scope="module")
def chain(resume_chain: dict) -> dict:
    return resume_chain


def test_killed_in_training_the_rerun_continues_from_the_checkpoint(chain: dict) -> None:
    killed = chain["train"]
    assert killed["returncode"] == -signal.SIGKILL, killed["stderr"][-2000:]
    assert killed["checkpoints"] == ["step-000002"]  # killed after the first of two saves
    assert "final" not in killed["entries"] and "quantized" not in killed["entries"]
    rerun = chain["quantize"]["log"]
    assert "resumed from" in rerun and "step-000002 at step 2" in rerun
    assert "trained 4 steps" in rerun


def test_killed_in_quantize_nothing_half_written_is_left_and_the_rerun_redoes_it(
    chain: dict,
) -> None:
    killed = chain["quantize"]
    assert killed["returncode"] == -signal.SIGKILL
    assert "final" in killed["entries"]
    assert "quantized" not in killed["entries"]  # the artifacts stayed in hidden staging
    assert any(h.startswith(".staging-quantized-") for h in killed["hidden"])
    rerun = chain["evaluate"]
    assert "not training again" in rerun["log"]
    assert "quantize 1/2: int8_weight_only" in rerun["log"]  # quantized again, from scratch
    assert "quantized" in rerun["entries"]
    assert not [h for h in rerun["hidden"] if "quantized" in h]  # leftovers cleared


def test_killed_in_evaluate_the_rerun_keeps_training_and_quantize(chain: dict) -> None:
    killed = chain["evaluate"]
    assert killed["returncode"] == -signal.SIGKILL
    assert "report.json" not in killed["entries"] and "report.md" not in killed["entries"]
    rerun = chain["publish"]
    assert "not training again" in rerun["log"]
    assert "not quantizing again" in rerun["log"]
    assert "teacher evaluated in" in rerun["log"]  # evaluated again, whole
    assert "report.json" in rerun["entries"]


def test_killed_in_publish_no_half_folder_and_the_rerun_skips_all_else(chain: dict) -> None:
    killed = chain["publish"]
    assert killed["returncode"] == -signal.SIGKILL
    assert "publish" not in killed["entries"]
    assert any(h.startswith(".staging-publish-") for h in killed["hidden"])
    done = chain["none"]
    assert done["returncode"] == 0, done["stderr"][-2000:]
    for skipped in ("not training again", "not quantizing again", "not evaluating again"):
        assert skipped in done["log"], skipped
    assert "published" in done["log"]
    assert done["hidden"] == []  # every staging leftover was cleared
    check_run_dir(chain["run_dir"], DEFAULT_METHODS, ["q8_0"], parity=False)
