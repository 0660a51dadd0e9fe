"""``calibration_forward.py`` with the rule autocal had before commit 889f23e: any ``forward`` set on an expert
module's instance (as compressed-tensors' offloading sets on every module) made each expert run on its own.

    python benchmarks/probes/before_offload_rule.py --offloaded [calibration_forward.py's arguments]

The "before" column of the offloaded tables in docs/benchmarks.md (session 5). A probe: it replaces a private
function, so it only applies to this checkout's autocal.
"""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS.parent))

from autocal.synthesize import experts as experts_module  # noqa: E402

experts_module._runs_own_forward = lambda module: "forward" not in module.__dict__
import calibration_forward  # noqa: E402

calibration_forward.main(sys.argv[1:])
