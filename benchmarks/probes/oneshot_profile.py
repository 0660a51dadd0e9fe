"""Where ``oneshot`` spends its time: each method's child of ``benchmarks/oneshot.py``, profiled.

Saves the model as ``oneshot.py`` does, runs each method's child once in a
fresh process with cProfile on inside LLM Compressor's ``Oneshot.__call__``
(the pipeline: not the imports, loading or autocal's ``prepare``), and writes
the top functions (cumulative and own time) to ``<out>/<method>.txt``. Run from the repository root, with llmcompressor
installed (on the GPU machine: the wheels of benchmarks/requirements-gpu.txt on
PYTHONPATH)::

    python benchmarks/probes/oneshot_profile.py --out /tmp/prof --dtype bfloat16 --layers 2 --experts 128 \\
        --hidden 2048 --width 768 --samples 32 --tokens 512

An analysis probe kept as it was run, not a benchmark: cProfile's own cost
inflates Python-heavy code.
"""

import argparse
import cProfile
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import oneshot  # noqa: E402

if sys.argv[1] == "--child":  # <stats file> then oneshot.py's child arguments
    from llmcompressor.entrypoints.oneshot import Oneshot
    profile, stats_file, call = cProfile.Profile(), sys.argv[2], Oneshot.__call__
    Oneshot.__call__ = lambda self: profile.runcall(call, self)
    oneshot.main(["--child", *sys.argv[3:]])
    profile.dump_stats(stats_file)
    sys.exit()

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--methods", nargs="+", default=["autocal", "incumbent"])
for name, default in (("layers", 2), ("experts", 128), ("hidden", 2048), ("width", 768), ("top_k", 8),
                      ("vocab", 1024), ("samples", 32), ("tokens", 512)):
    parser.add_argument(f"--{name}", type=int, default=default)
parser.add_argument("--threads", type=int)
parser.add_argument("--dtype", default="bfloat16")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory() as folder:
    model = Path(folder) / "model"
    oneshot.save_model(args, model)
    for method in args.methods:
        stats = args.out / f"{method}.prof"
        command = [sys.executable, __file__, "--child", str(stats), method, "--model", str(model), "--dtype", args.dtype] + [
            f"--{k}={getattr(args, k)}" for k in ("layers", "experts", "hidden", "width", "top_k", "vocab",
                                                   "samples", "tokens", "threads") if getattr(args, k) is not None]
        run = subprocess.run(command, capture_output=True, text=True)
        print(method, run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:])
        with open(args.out / f"{method}.txt", "w") as report:
            table = pstats.Stats(str(stats), stream=report)
            table.sort_stats("cumulative").print_stats(70)
            table.sort_stats("tottime").print_stats(40)
