"""An agent runs only the job types hexcore/cluster/jobs.py names: anything else is answered with an
error and never started."""

from dataclasses import dataclass

from hexcore.cluster.jobs import JOBS, NodeJobs, job_type_name
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
