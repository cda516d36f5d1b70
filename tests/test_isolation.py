"""The suite's own promise (conftest.py): tests write to an OVERFILL_HOME of their own, never the user's cache,
and still find the bundled model there."""

import subprocess
import sys

from conftest import BUNDLED_HOME
from overfill.home import overfill_home
from overfill.zoo import ZOO


def test_tests_write_to_a_home_of_their_own():
    home = overfill_home().resolve()
    assert home != BUNDLED_HOME.resolve() and BUNDLED_HOME.resolve() not in home.parents
    for name in ZOO:  # a bundled model already materialised is found through the tests' home, in its one place
        if (BUNDLED_HOME / "models" / name / "config.json").is_file():
            assert (home / "models" / name).resolve() == (BUNDLED_HOME / "models" / name).resolve()
    # what a command run as a child process sees too
    child = subprocess.run([sys.executable, "-c", "from overfill.home import overfill_home; print(overfill_home())"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == str(overfill_home())
