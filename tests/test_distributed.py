"""The command line that DDP's ranks > 0 are started with, inside a Hydra multirun."""

from kiln.training.distributed import job_command_line


def test_the_sweep_becomes_the_jobs_own_overrides_with_hydras_flags_kept():
    argv = ["train.py", "-m", "--config-dir", "/mine", "trainer=ddp_cpu", "model.net.hidden_sizes=[8],[16]"]
    job = ["trainer=ddp_cpu", "model.net.hidden_sizes=[16]"]
    assert job_command_line(argv, job) == ["train.py", "--config-dir", "/mine", *job]


def test_flags_in_equals_form_and_long_multirun_are_handled():
    argv = ["train.py", "--multirun", "--config-dir=/mine", "seed=1,2"]
    assert job_command_line(argv, ["seed=2"]) == ["train.py", "--config-dir=/mine", "seed=2"]
