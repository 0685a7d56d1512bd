"""Runs one experiment script's ``main`` on many argument lists in one process (the CLI error
tests): ``python tests/cli_driver.py MODULE CASES_JSON`` prints, per case, what the script
printed to stderr and its exit status, as a JSON list."""

import contextlib
import importlib
import io
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("PLATEAU_JAX_NO_PROGRESS", "1")

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402


def main(module_name, cases):
    module = importlib.import_module(module_name)
    if hasattr(module, "define_flags"):
        module.define_flags()
    results = []
    for argv in cases:
        flags.FLAGS.unparse_flags()
        err = io.StringIO()
        status = 0
        with contextlib.redirect_stderr(err):
            try:
                rest = common.parse_flags([module_name] + argv)
                module.main(rest)
            except SystemExit as e:
                if isinstance(e.code, str):  # what the interpreter prints, with status 1
                    err.write(e.code + "\n")
                    status = 1
                else:
                    status = e.code
            except BaseException:  # noqa: BLE001 - a traceback is what the test looks for
                err.write(traceback.format_exc())
                status = "traceback"
        results.append({"argv": argv, "status": status, "stderr": err.getvalue()})
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
