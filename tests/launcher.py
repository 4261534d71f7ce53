"""python tests/launcher.py SPEC [train.py arguments]: train.main(arguments), as `python train.py` runs it, with
one project function wrapped so that a moment inside the process is reached deterministically, without test hooks
in the project's code. Used by tests/helpers.py's `launch` (also under torchrun, one launcher per rank).

SPEC is JSON:
  {"wrap": "train.ema_update", "call": 7, "action": "kill"}   the 7th call SIGKILLs this process
  "action": "signal", "signal": 2                             ... sends it SIGINT (then the call goes on)
  "action": "signal", "signal": 2, "times": 2                 ... twice, the second once the first was handled
  "inside": "train.save_checkpoint", "inside_call": 4         count calls of `wrap` only during that call of it
  "rank": 1                                                    act in that process of a torchrun launch only
  {"wrap": "ddpm.loss", "call": 2, "action": "nan"}            the 2nd call returns a NaN loss (its gradient is kept)
  {"wrap": "train.save_checkpoint", "call": 1, "action": "disk-full"}   the 1st call raises OSError ENOSPC
  {}                                                           nothing: just count

Every run counts its training steps (calls of train.train_step) and writes the number to launcher.steps.<RANK>
when train.main returns or exits (not when killed): a resumed run must execute only the steps it had left.

Under torchrun, once train.main has returned or exited, a rank ignores SIGTERM and waits (at most WAIT_S) until
every rank has got there. torchrun's agent sends SIGTERM to the ranks still running as soon as one exits with an
error; on a loaded machine that ended a slower rank before it printed its error line, or while its interpreter
was closing down (reported as -15), and tests read every rank's line and exit code. Both happen after train.main,
out of its sight: what it prints and the exit code it chose are unchanged, a rank that never gets there still
shows (the others stop waiting after WAIT_S), and the agent still kills a rank that hangs (SIGKILL after 30 s).
"""
import errno
import importlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

spec = json.loads(sys.argv[1])
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402  (after the project folder is on the path)

state = {"inside": 0, "active": spec.get("inside") is None, "calls": 0, "steps": 0}
WAIT_S = 120


def patch(dotted: str, make) -> None:
    module, name = dotted.rsplit(".", 1)
    module = importlib.import_module(module)
    setattr(module, name, make(getattr(module, name)))


def counting(real):
    def wrapper(*args, **kwargs):
        state["inside"] += 1
        state["active"] = state["inside"] == spec["inside_call"]
        try:
            return real(*args, **kwargs)
        finally:
            state["active"] = False
    return wrapper


def trigger(real):
    here = spec.get("rank") is None or int(os.environ.get("RANK", "0")) == spec["rank"]

    def wrapper(*args, **kwargs):
        if state["active"] and here:
            state["calls"] += 1
            if state["calls"] == spec["call"]:
                if spec["action"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if spec["action"] == "disk-full":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                if spec["action"] == "nan":
                    out = real(*args, **kwargs)
                    return out + math.nan - out.detach()  # the value is NaN, the gradient stays finite
                for _ in range(spec.get("times", 1)):
                    os.kill(os.getpid(), spec["signal"])
                    time.sleep(0.2)  # the handler runs during the sleep (a second signal must not merge with it)
        return real(*args, **kwargs)
    return wrapper


def steps(real):
    def wrapper(*args, **kwargs):
        state["steps"] += 1
        return real(*args, **kwargs)
    return wrapper


def leave_together() -> None:
    """Return once every rank of this torchrun launch has called this, or after WAIT_S."""
    run, world, rank = os.environ["TORCHELASTIC_RUN_ID"], int(os.environ["WORLD_SIZE"]), os.environ["RANK"]
    Path(f"launcher.done.{run}.{rank}").touch()
    deadline = time.monotonic() + WAIT_S
    while (time.monotonic() < deadline
           and not all(Path(f"launcher.done.{run}.{r}").exists() for r in range(world))):
        time.sleep(0.05)


patch("train.train_step", steps)
if spec.get("inside"):
    patch(spec["inside"], counting)
if spec.get("wrap"):
    patch(spec["wrap"], trigger)
try:
    train.main(sys.argv[2:])
finally:
    Path(f"launcher.steps.{os.environ.get('RANK', '0')}").write_text(str(state["steps"]))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        leave_together()
