"""ZeroGPU: a GPU attached per call through `spaces.GPU`, and fine-tuning cut into calls that each fit one slot.

On a ZeroGPU Space (`SPACES_ZERO_GPU` set) a function decorated with `spaces.GPU(duration=S)` gets a GPU for at most
S seconds, in a worker process: its arguments and results travel pickled, and it sees nothing the app changes while
it runs. Generation and attention fit one call. A fine-tune does not, so `finetune_in_slots` trains in chunks: each
chunk is one GPU call that runs `finetune` until its time budget is nearly spent, then stops with a checkpoint
(`should_stop`), and the next chunk resumes from it exactly (train/core.py's Loop), so the weights are those of one
straight run. Between chunks the app's Stop is honoured; inside one, the stop request reaches the worker as a file
in the checkpoint folder, and progress comes back as the chunk's yields.

Elsewhere (`spaces` not installed, or installed off ZeroGPU, where its decorator does nothing) the same code runs in
one call: `finetune_in_slots` is then `finetune` with a generator in between.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

ZERO_GPU = bool(os.environ.get("SPACES_ZERO_GPU"))  # set by Hugging Face on ZeroGPU hardware
log = logging.getLogger("imagecraft.serve")
SLOT_SECONDS = int(os.environ.get("IMAGECRAFT_GPU_SLOT", "120"))  # one fine-tune chunk's GPU call
SAFETY = 0.85  # of a slot a chunk plans to use: the rest absorbs a slow step, the checkpoint, the exit
FINISH = 0.3  # of a slot kept for the closing previews and export when the last step is next


def spaces_gpu():
    """`spaces.GPU` when the package is there (a no-op off ZeroGPU), else a decorator that does nothing; both take
    `fn` or `duration=`."""
    try:
        import spaces

        return spaces.GPU
    except ImportError:
        def gpu(fn=None, duration=None):
            return fn if fn is not None else (lambda f: f)

        return gpu


def stop_file(output) -> Path:
    """The stop request of a running chunk: a file beside the checkpoint, which a worker process can see."""
    return Path(output) / "checkpoints" / "stop-requested"


def train_chunk(model, data, output, recipe, budget: float):
    """One slot's share of a fine-tune: `finetune` from the checkpoint until `budget` seconds are nearly spent (or
    the stop file appears), ending with a checkpoint. Yields ("progress", step, steps, loss) after each step, then
    ("result", FinetuneResult). A generator so that progress leaves the GPU worker while it trains."""
    from ..train.finetune import finetune

    started = time.monotonic()
    # setup: loading, caches, base previews and the first step; longest: a step with its checkpoint and previews
    clock = {"setup": None, "last": started, "longest": 0.0, "step": 0}
    events: queue.Queue = queue.Queue()

    def progress(step, steps, loss):
        now = time.monotonic()
        if clock["setup"] is None:
            clock["setup"] = now - started
        else:
            clock["longest"] = max(clock["longest"], now - clock["last"])
        clock["last"], clock["step"] = now, step
        events.put(("progress", step, steps, loss))

    def out_of_time() -> bool:
        """Whether one more step would leave too little of the slot: for stopping (a checkpoint, the curves) about
        the setup's time; before the last step, also for the closing previews and export (FINISH of the slot)."""
        if stop_file(output).exists():
            return True
        setup = clock["setup"] or 0.0
        reserve = setup if clock["step"] < recipe.steps - 1 else max(2 * setup, FINISH * budget)
        return time.monotonic() - started + (clock["longest"] or setup) + reserve > SAFETY * budget

    def train():
        try:
            events.put(("result", finetune(model, data, output, recipe, progress=progress, should_stop=out_of_time,
                                           show_bar=False)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread and raised there
            events.put(("error", e))

    worker = threading.Thread(target=train, daemon=True, name="finetune-chunk")
    worker.start()
    while True:
        event = events.get()
        if event[0] == "error":
            raise event[1]
        yield event
        if event[0] == "result":
            worker.join()
            log.info("GPU slot: %.1f s of %.0f (setup %.1f s, longest step %.2f s), at step %d of %d",
                     time.monotonic() - started, budget, clock["setup"] or 0, clock["longest"], event[1].step,
                     recipe.steps)
            return


# decorated once, at import: ZeroGPU registers its GPU functions before the app starts
GPU_CHUNK = spaces_gpu()(duration=SLOT_SECONDS)(train_chunk)


def finetune_in_slots(model, data, output, recipe=None, progress=None, should_stop=None, show_bar: bool = False,
                      slot: float | None = None, gpu=None):
    """`finetune` (same arguments, same result) as a series of GPU calls of `slot` seconds each (default
    IMAGECRAFT_GPU_SLOT, 120), each resuming from the previous one's checkpoint. `gpu`: the decorator to run each
    chunk under (default `spaces.GPU`). Raises TrainingError when a slot is too short for a single step."""
    from ..train.core import TrainingError
    from ..train.recipe import FinetuneRecipe, check_recipe

    recipe = check_recipe(recipe or FinetuneRecipe())
    if slot is None and gpu is None:
        chunk, slot = GPU_CHUNK, float(SLOT_SECONDS)
    else:
        slot = float(slot or SLOT_SECONDS)
        chunk = (gpu or spaces_gpu())(duration=slot)(train_chunk)
    flag = stop_file(output)
    flag.unlink(missing_ok=True)
    step = -1
    try:
        while True:
            result = None
            for event in chunk(model, data, output, recipe, slot):
                if event[0] == "result":
                    result = event[1]
                    continue
                if progress is not None:
                    progress(*event[1:])
                if should_stop is not None and should_stop():
                    flag.parent.mkdir(parents=True, exist_ok=True)
                    flag.touch()
            if not result.stopped or flag.exists() or (should_stop is not None and should_stop()):
                return result
            if result.step <= step:
                raise TrainingError(f"a GPU slot of {slot:g} s is too short to load the model and train one step; "
                                    f"set IMAGECRAFT_GPU_SLOT higher (the checkpoint at step {result.step} is kept)")
            step = result.step
    finally:
        flag.unlink(missing_ok=True)


def trainer():
    """The fine-tune function the app's training queue should call: in slots on ZeroGPU, else `finetune`."""
    if ZERO_GPU:
        return finetune_in_slots
    from ..train.finetune import finetune

    return finetune


def hardware_notes(zero_gpu: bool = ZERO_GPU) -> dict[str, str]:
    """Per tab, what this hardware cannot do (Markdown, empty when it can do everything), so that the tab says so
    instead of failing. Reads the environment only: nothing here touches CUDA."""
    notes = {"generate": "", "attention": "", "finetune": ""}
    if zero_gpu:
        try:
            import spaces  # noqa: F401
        except ImportError:
            missing = ("**This ZeroGPU Space lacks the `spaces` package**, which attaches the GPU to each request: "
                       "this tab cannot run until it is installed.")
            return {tab: missing for tab in notes}
        notes["finetune"] = (f"On ZeroGPU a fine-tune trains in GPU slots of {SLOT_SECONDS:g} s, each resuming from "
                             f"the last one's checkpoint; the live view updates as each slot reports.")
    elif os.environ.get("SPACE_ID") and not os.environ.get("IMAGECRAFT_DEVICE", "").startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            notes["finetune"] = ("This Space runs on a CPU: fine-tuning suits the built-in model (minutes); a Stable "
                                 "Diffusion-size model needs GPU hardware.")
    return notes
