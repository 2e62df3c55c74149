"""Runs several scripts one after another in this process, each as ``__main__`` with its own command line, so that
one (distributed) launch covers them all and its start-up is paid once.

    python launch_each.py SCRIPTS.json    # a JSON list of [script, [arguments...]]
"""

import json
import runpy
import sys

for script, arguments in json.loads(open(sys.argv[1]).read()):
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")
