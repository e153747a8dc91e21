"""Helpers only the tests use; the tiny models themselves are in imagecraft.testing (the benchmarks use them too)."""

import re
import socket
from contextlib import contextmanager


def rel_err(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def diffusers_vae_to_ldm(state: dict) -> dict:
    """A diffusers AutoencoderKL state dict under the original LDM names (what single files hold), for tests."""
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks."))
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
        (r"^(en|de)coder\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}coder.mid.block_{int(m[2]) + 1}."),
        (r"^(en|de)coder\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}coder.mid.attn_1."),
        (r"^(en|de)coder\.conv_norm_out\.", lambda m: f"{m[1]}coder.norm_out."),
    ]
    leaf = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
            "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        head, _, param = new.rpartition(".")
        for a, b in leaf.items():
            if head.endswith("." + a):
                head = head[: -len(a)] + b
        if ".attn_1." in new and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out["first_stage_model." + head + "." + param] = value
    return out


def iou(a, b) -> float:
    """Intersection over union of two boolean masks (0 where both are empty)."""
    return float((a & b).sum() / max((a | b).sum(), 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(concurrency: int):
    """The app launched in this process on a free localhost port, as `python app.py` queues it; yields its URL."""
    import app  # Gradio and the app load only for the tests that serve it

    demo = app.build_demo()
    port = free_port()
    demo.queue(default_concurrency_limit=concurrency).launch(server_name="127.0.0.1", server_port=port, css=app.CSS,
                                                              prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
