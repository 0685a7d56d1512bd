"""Prints a pip constraints file pinning every dependency in setup.cfg (install_requires and the
test extra) at its floor: ``name>=X`` becomes ``name==X``; exact pins stay as they are.

.ci/run installs the project with these constraints in a second virtualenv and runs the fast
tests, so that the floors setup.cfg states are versions the code really works with."""

import configparser
import os
import re
import sys


def floors(setup_cfg):
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    reqs = cfg["options"]["install_requires"].split("\n")
    reqs += cfg["options.extras_require"]["test"].split("\n")
    out = []
    for req in filter(None, (r.split("#")[0].strip() for r in reqs)):
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(>=|==)\s*([^,;\s]+)", req)
        if not m:
            sys.exit(f"{setup_cfg}: {req!r} has no floor (name>=X or name==X)")
        out.append(f"{m.group(1)}=={m.group(3)}")
    return out


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    print("\n".join(floors(sys.argv[1] if len(sys.argv) > 1 else
                           os.path.join(here, "..", "setup.cfg"))))
