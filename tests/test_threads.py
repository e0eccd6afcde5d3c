"""--threads: every usable core by default, a number when given, one-line error below 1."""
import pytest
import torch

from casp.cli import main
from casp.errors import CaspError
from casp.threads import usable_cores, use_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_every_usable_core(restore_threads):
    torch.set_num_threads(1)
    assert use_threads() == usable_cores() == torch.get_num_threads()


def test_a_given_number_is_set_and_zero_is_refused(restore_threads):
    assert use_threads(1) == 1 and torch.get_num_threads() == 1
    with pytest.raises(CaspError, match="--threads must be at least 1"):
        use_threads(0)


def test_cli_flag_is_one_line_error(capsys, tmp_path):
    assert main(["compress", "-o", str(tmp_path / "o"), "--threads", "0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("casp: error") or "--threads must be at least 1" in err[-1]
    assert not (tmp_path / "o").exists()
