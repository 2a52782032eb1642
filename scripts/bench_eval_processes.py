"""Time `adalora eval RUN` in one process and shared out among N processes (`torchrun --nproc_per_node N`), and check
that both give the same metrics.

    python scripts/bench_eval_processes.py runs/sst2 --processes 2            # GPUs: one per process (NCCL)
    python scripts/bench_eval_processes.py runs/sst2 --processes 2 --cpu      # CPU processes (gloo)

With --cpu the GPUs are hidden; the single process computes with every core (--single-threads to choose) and each
of the N processes with cores / N threads (--threads). On a busy machine a process of several threads can be slower
than one of a single thread: compare with --single-threads 1 before crediting the processes. Both commands write RUN/eval.json, as `adalora eval` does. Prints both wall
times (model loading and data included: what a person waits for) and exits 1 when the metrics differ.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_eval(run: Path, processes: int, env: dict[str, str]) -> tuple[float, dict]:
    """(wall seconds, printed metrics) of `adalora eval RUN` in `processes` processes."""
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    started = time.perf_counter()
    proc = subprocess.run([*launcher, "-m", "adalora_cli", "eval", str(run)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"adalora eval on {processes} process(es) failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a trained run folder")
    parser.add_argument("--processes", type=int, default=2, help="processes of the sharded evaluation")
    parser.add_argument("--cpu", action="store_true", help="hide the GPUs: CPU processes on the gloo backend")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of each of the N processes (default: cores / N)")
    parser.add_argument("--single-threads", type=int, default=None,
                        help="CPU threads of the single process (default: PyTorch's, every core)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    one_env = env if args.single_threads is None else {**env, "OMP_NUM_THREADS": str(args.single_threads)}
    one_wall, one = timed_eval(args.run, 1, one_env)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.processes)
    many_wall, many = timed_eval(args.run, args.processes, {**env, "OMP_NUM_THREADS": str(threads)})
    same = one == many
    print(f"1 process: {one_wall:.1f} s; {args.processes} processes ({threads} thread(s) each): {many_wall:.1f} s; "
          f"speed-up {one_wall / many_wall:.2f}x; metrics {'equal' if same else 'DIFFER'}: {one}"
          + ("" if same else f" vs {many}"))
    if args.json is not None:
        args.json.write_text(json.dumps({"run": str(args.run), "processes": args.processes, "threads": threads,
                                         "one_process_s": round(one_wall, 2), "processes_s": round(many_wall, 2),
                                         "one": one, "sharded": many, "equal": same}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
