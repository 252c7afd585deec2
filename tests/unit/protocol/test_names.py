"""Job names become subject tokens and consumer names: only safe ones get through."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol.names import SCORED, check_job, job_consumer, scored_stage, scored_subject
from tests.helpers import make_task


def test_a_job_has_its_own_scored_subject_and_consumer():
    assert scored_subject("eval-gsm8k_1") == "aha.scored.eval-gsm8k_1"
    assert job_consumer("eval-gsm8k_1") == "job-eval-gsm8k_1"
    assert scored_stage("train") == SCORED  # the learner's: `learner` on aha.scored.train
    assert (SCORED.subject, SCORED.durable, SCORED.stream_subjects) == (
        "aha.scored.train",
        "learner",
        "aha.scored.>",
    )


@pytest.mark.parametrize(
    "job", ["", "a.b", "train.>", "*", ">", "a b", "a\nb", "é", "x" * 65, "../x", "$JS"]
)
def test_a_job_name_that_would_leave_its_subject_is_refused(job):
    with pytest.raises(ValueError, match="job name"):
        check_job(job)
    with pytest.raises(ValidationError, match="job name"):
        make_task(1, job=job)


def test_a_task_belongs_to_the_training_job_unless_it_says_otherwise():
    assert make_task(1).job == "train"
    assert make_task(1, job="rs-3").job == "rs-3"
