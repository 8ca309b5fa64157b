"""Run a command with a time limit that lets pytest save its results: SIGINT at the limit (pytest stops, prints
its summary and pytest-benchmark writes the benchmarks that finished), SIGKILL GRACE_SECONDS later if that was not
enough.

The command starts with SIGINT's default action even when this process was started with SIGINT ignored, which a
shell does to every background job (`cmd &`, `nohup ... &`, a remote runner): an ignored disposition is inherited
across exec, and a SIGINT would then do nothing until the SIGKILL lost everything.

usage: python benchmarks/limit.py SECONDS COMMAND [ARGS...]    exit status: the command's (124 past the limit)
"""
import signal
import subprocess
import sys

# With 5 s, pytest on a loaded 2-core CPU had written the benchmarks' JSON but not yet its summary when the SIGKILL
# came (tests/test_gpu_check.py failed so); a process that stops at once does not wait for the grace.
GRACE_SECONDS = 15


def run_limited(seconds, command):
    process = subprocess.Popen(command, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return 124


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the command itself; this waits for it
    sys.exit(run_limited(float(sys.argv[1]), sys.argv[2:]))


if __name__ == "__main__":
    main()
