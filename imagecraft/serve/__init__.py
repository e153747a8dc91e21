"""What the app's buttons do, one module per job:

    models.py    the shared model cache, and the lock that keeps a request's LoRA away from the others
    outputs.py   the folders a server writes, pruned to a TTL and a size cap
    actions.py   generation to PNG files, PNG restore, attention maps and their redraws
    jobs.py      uploads, the demo data and the one-at-a-time training queue
    handlers.py  the Gradio side: each event's handler, errors as messages, cancellation
    zerogpu.py   ZeroGPU: `spaces.GPU`, fine-tuning in GPU slots, what a tab cannot do on this hardware
    deploy.py    `imagecraft deploy`: the files, front matter and variables of a Space, checked, and the upload

Only handlers.py imports Gradio; the others serve any front end (and the tests) as plain functions.
"""
