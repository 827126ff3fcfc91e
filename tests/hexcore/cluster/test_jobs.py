"""An agent runs only the job types hexcore/cluster/jobs.py names: anything else is answered with an
error and never started. A job that raises or overruns its time is a JobFailed saying so."""

from dataclasses import dataclass

import pytest

from hexcore.cluster.jobs import JOBS, JobFailed, NodeJobs, job_type_name, run_here
from hexcore.cluster.messages import RunJob


@dataclass(frozen=True)
class Shell:
    command: str

    def run(self):  # would run anything, if an agent ran it
        raise AssertionError("an agent ran a job type it does not know")


def test_an_agent_refuses_a_job_type_outside_its_fixed_set_without_starting_it():
    jobs = NodeJobs()
    jobs.start(RunJob(7, Shell("rm -rf /"), timeout_seconds=5))
    (done,) = jobs.reap()
    assert done.job_id == 7 and done.result is None
    assert "test_jobs.Shell is not one of the jobs a node runs" in done.error
    assert jobs.reap() == [] and not jobs._running


def test_the_fixed_set_names_the_calibration_jobs():
    from planning.calibrate.node_jobs import DeviceProfileJob, LinkEndpointJob

    assert {job_type_name(DeviceProfileJob.__new__(DeviceProfileJob)),
            job_type_name(LinkEndpointJob.__new__(LinkEndpointJob))} == JOBS


def profile_job(dtype: str = "float32"):
    from planning.calibrate.node_jobs import DeviceProfileJob

    return DeviceProfileJob("x-cpu", "a test", dtype, num_threads=1, memory_gb=1.0, is_quick=True)


@pytest.mark.slow  # a job process
def test_a_job_that_raises_is_a_job_failed_with_its_error():
    with pytest.raises(JobFailed, match="DeviceProfileJob failed on this host: KeyError: 'float8'"):
        run_here(profile_job("float8"), timeout_seconds=120)


@pytest.mark.slow  # a job process
def test_a_job_past_its_time_is_stopped():
    with pytest.raises(JobFailed, match="timed out after 0 s"):
        run_here(profile_job(), timeout_seconds=0.2)
