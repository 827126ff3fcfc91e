from tests.cluster.conftest import emulated_cluster  # noqa: F401 (the fixture, for the calibration across hosts)
