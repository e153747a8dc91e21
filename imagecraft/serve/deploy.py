"""Deploys the app to a Hugging Face Space with huggingface_hub: `imagecraft deploy --space USER/NAME`.

    imagecraft deploy --space you/imagecraft --dry-run      # what would go up, checked against the Hub's limits
    imagecraft deploy --space you/imagecraft                # create the Space, upload, set its variables
    imagecraft deploy --space you/imagecraft --hardware zero-a10g --models default,stable-diffusion-v1-5/stable-diffusion-v1-5

A Space needs only what the app runs: app.py, requirements.txt, the package, the built-in model and the README whose
front matter configures the Space (SDK, its version, the app file, Python). No history, tests, benchmarks or docs
figures go up. `upload_folder` sends binaries (safetensors, PNGs) through LFS/Xet itself; `.gitattributes` goes
too, so that a `git clone` of the Space and a later `git push` keep them in LFS.

The Hub's limits checked here (https://huggingface.co/docs/hub/repositories-recommendations): a file over 10 MB,
or a binary one, must be stored with LFS/Xet (the API does that; a git push needs `.gitattributes` to say so), and a
Space repository holds at most 1 GB.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: app.py beside the package
# what the Space runs, and nothing else: files, and folders taken whole but for SKIPPED
SPACE_FILES = ("app.py", "requirements.txt", "README.md", ".gitattributes")
SPACE_FOLDERS = ("imagecraft", "assets/shapes-sd")
SKIPPED = ("__pycache__", "*.pyc", "*.pyo", "*.egg-info", ".DS_Store", ".ipynb_checkpoints")
NEVER = ("tests", "bench", "docs", ".git", ".venv")  # top-level folders that must not go up (checked)

MAX_REGULAR_BYTES = 10 * 1000 * 1000  # the Hub refuses a file over 10 MB that is not in LFS/Xet
MAX_SPACE_BYTES = 1000 ** 3  # a Space repository holds at most 1 GB
PYTHON_VERSIONS = ("3.10", "3.11", "3.12", "3.13")  # what Spaces build images for
COLOURS = ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")  # colorFrom, colorTo
HARDWARE = ("cpu-basic", "cpu-upgrade", "zero-a10g", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "a10g-small",
            "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large")


@dataclass(frozen=True)
class Variable:
    """One of the Space variables the app reads (README: Deploying to Hugging Face Spaces)."""
    name: str
    flag: str
    kind: type  # int, float or str; numbers must be positive
    help: str


VARIABLES = [
    Variable("IMAGECRAFT_MODELS", "--models", str, "the only models the app offers and loads, comma-separated "
             "folders or Hub ids, 'default' for the built-in one (a public Space: 'default' unless given)"),
    Variable("IMAGECRAFT_MAX_COST", "--max-cost", int, "the largest width x height x steps x images of one request"),
    Variable("IMAGECRAFT_MAX_MODELS", "--max-models", int, "models kept loaded at once"),
    Variable("IMAGECRAFT_OUTPUT_TTL", "--output-ttl", float, "seconds generated files are kept"),
    Variable("IMAGECRAFT_OUTPUT_MB", "--output-mb", float, "MB all generated files may take"),
    Variable("IMAGECRAFT_ATTENTION_MB", "--attention-mb", float, "the most attention-map memory of one request"),
    Variable("IMAGECRAFT_KEEP_JOBS", "--keep-jobs", int, "finished fine-tune jobs whose folders are kept"),
    Variable("IMAGECRAFT_CONCURRENCY", "--concurrency", int, "generations run at once"),
]
LFS = "filter=lfs diff=lfs merge=lfs -text"


@dataclass
class SpaceFile:
    path: str  # in the Space, POSIX
    size: int
    binary: bool

    @property
    def needs_lfs(self) -> bool:
        return self.binary or self.size > MAX_REGULAR_BYTES


@dataclass
class Plan:
    """What a deploy uploads and sets, and what is wrong with it (`problems`: sentences; empty when it may go up)."""
    root: Path
    space: str
    files: list[SpaceFile]
    front_matter: dict
    variables: dict[str, str]
    private: bool
    hardware: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


# --- what goes up ---------------------------------------------------------------------------------------------
def is_binary(path: Path) -> bool:
    """The Hub's test, roughly: a NUL byte or bytes that are not UTF-8 near the start."""
    head = path.read_bytes()[:8000] if path.stat().st_size <= 8000 else path.open("rb").read(8000)
    if b"\x00" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # a multi-byte character cut at the end is text
    return False


def space_files(root: Path = ROOT) -> list[SpaceFile]:
    """Every file the Space needs, sorted, with its size."""
    found = []
    for name in SPACE_FILES:
        if not (root / name).is_file():
            raise ValueError(f"{root / name} is missing: a Space needs it (run from a checkout of ImageCraft)")
        found.append(root / name)
    for folder in SPACE_FOLDERS:
        if not (root / folder).is_dir():
            raise ValueError(f"{root / folder} is missing: a Space needs it (run from a checkout of ImageCraft)")
        for path in sorted((root / folder).rglob("*")):
            parts = path.relative_to(root).parts
            if path.is_file() and not any(fnmatch.fnmatch(p, pattern) for p in parts for pattern in SKIPPED):
                found.append(path)
    return sorted((SpaceFile(p.relative_to(root).as_posix(), p.stat().st_size, is_binary(p)) for p in found),
                  key=lambda f: f.path)


def lfs_patterns(gitattributes: str) -> list[str]:
    """The patterns .gitattributes stores with LFS."""
    patterns = []
    for line in gitattributes.splitlines():
        words = line.split()
        if len(words) > 1 and not words[0].startswith("#") and "filter=lfs" in words[1:]:
            patterns.append(words[0])
    return patterns


def tracked_by_lfs(path: str, patterns: list[str]) -> bool:
    """Whether git would store `path` with LFS: a pattern without a slash matches the name in any folder."""
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        if "/" in pattern:
            if fnmatch.fnmatch(path, pattern.replace("**/", "*")) or fnmatch.fnmatch(path, pattern):
                return True
        elif fnmatch.fnmatch(name, pattern):
            return True
    return False


def front_matter(readme: str) -> dict:
    """The YAML block between the README's first two `---` lines."""
    import yaml

    match = re.match(r"---\n(.*?)\n---\n", readme, re.S)
    if not match:
        raise ValueError("README.md has no front matter: a Space reads its SDK, version and app file from a YAML "
                         "block between two '---' lines at the top")
    data = yaml.safe_load(match.group(1))
    if not isinstance(data, dict):
        raise ValueError("README.md's front matter is not a YAML mapping of fields")
    return data


def gradio_pin(requirements: str) -> str | None:
    """The version `gradio==X` pins in requirements.txt, None without a pin."""
    for line in requirements.splitlines():
        match = re.match(r"\s*gradio\s*==\s*([\w.]+)\s*(#.*)?$", line)
        if match:
            return match.group(1)
    return None


def check_front_matter(meta: dict, requirements: str, paths: set[str]) -> list[str]:
    problems = []
    if meta.get("sdk") != "gradio":
        problems.append(f"front matter: sdk must be 'gradio' (the app is a Gradio app, and ZeroGPU needs it), "
                        f"got {meta.get('sdk')!r}")
    pin = gradio_pin(requirements)
    if pin is None:
        problems.append("requirements.txt does not pin gradio (gradio==X): the Space's sdk_version must match it")
    elif str(meta.get("sdk_version")) != pin:
        problems.append(f"front matter: sdk_version {meta.get('sdk_version')!r} differs from requirements.txt's "
                        f"gradio=={pin}: the Space would install one and run the other")
    if meta.get("app_file") not in paths:
        problems.append(f"front matter: app_file {meta.get('app_file')!r} is not among the uploaded files")
    python = meta.get("python_version")
    if not isinstance(python, str) or python not in PYTHON_VERSIONS:
        problems.append(f"front matter: python_version must be a quoted one of {', '.join(PYTHON_VERSIONS)} "
                        f"(3.10 unquoted is the number 3.1), got {python!r}")
    for key in ("colorFrom", "colorTo"):
        if key in meta and meta[key] not in COLOURS:
            problems.append(f"front matter: {key} must be one of {', '.join(COLOURS)}, got {meta[key]!r}")
    if not str(meta.get("title", "")).strip():
        problems.append("front matter: the Space needs a title")
    if len(str(meta.get("short_description", ""))) > 60:
        problems.append("front matter: short_description is limited to 60 characters")
    return problems


def check_variables(values: dict[str, str]) -> list[str]:
    problems = []
    kinds = {v.name: v for v in VARIABLES}
    for name, text in values.items():
        variable = kinds.get(name)
        if variable is None or variable.kind is str:
            if not text.strip():
                problems.append(f"{name} is empty: leave it out to use the app's default")
            continue
        try:
            number = variable.kind(text)
        except ValueError:
            number = None
        if number is None or number <= 0:
            problems.append(f"{variable.flag} ({name}) must be a positive {variable.kind.__name__}, got {text!r}")
    return problems


def plan(space: str, root: Path = ROOT, private: bool = False, hardware: str | None = None,
         variables: dict[str, str] | None = None) -> Plan:
    """The files, front matter and variables of a deploy of `root` to `space`, checked against the Hub's limits."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", space or "") or ".." in space:
        raise ValueError(f"--space must be USER/NAME (or ORG/NAME), got {space!r}")
    if hardware is not None and hardware not in HARDWARE:
        raise ValueError(f"--hardware must be one of {', '.join(HARDWARE)}, got {hardware!r}")
    values = {k: str(v) for k, v in (variables or {}).items() if v is not None}
    if not private:
        values.setdefault("IMAGECRAFT_MODELS", "default")  # a public Space loads only its allowlist
    files = space_files(root)
    meta = front_matter((root / "README.md").read_text(encoding="utf-8"))
    result = Plan(root, space, files, meta, dict(sorted(values.items())), private, hardware)
    paths = {f.path for f in files}
    result.problems += check_front_matter(meta, (root / "requirements.txt").read_text(encoding="utf-8"), paths)
    result.problems += check_variables(values)
    patterns = lfs_patterns((root / ".gitattributes").read_text(encoding="utf-8"))
    for f in files:
        if f.path.split("/", 1)[0] in NEVER or f.path.endswith((".pyc", ".egg-info")):
            result.problems.append(f"{f.path} must not go to the Space")
        if f.needs_lfs and not tracked_by_lfs(f.path, patterns):
            why = "is binary" if f.binary else f"is over {MAX_REGULAR_BYTES // 10**6} MB"
            result.problems.append(f"{f.path} {why} and .gitattributes does not store it with LFS: a git push "
                                   f"would be refused; add a line like '*{Path(f.path).suffix} {LFS}'")
    if result.total > MAX_SPACE_BYTES:
        result.problems.append(f"the upload is {result.total / 1e6:.0f} MB, over a Space's "
                               f"{MAX_SPACE_BYTES / 1e9:.0f} GB: keep large models on the Hub as model repositories")
    return result


def describe(p: Plan) -> str:
    """The dry run's report: every file with its size and how it goes up, the front matter, the variables."""
    lines = [f"Space {p.space} ({'private' if p.private else 'public'}, hardware {p.hardware or 'cpu-basic'}, "
             f"Gradio SDK) from {p.root}", "", f"{len(p.files)} files, {p.total / 1e6:.1f} MB:"]
    width = max(len(f.path) for f in p.files)
    for f in p.files:
        lines.append(f"  {f.path:<{width}}  {f.size:>12,}  {'LFS/Xet' if f.needs_lfs else 'regular'}")
    lines += ["", "front matter (README.md):"] + [f"  {k}: {v!r}" if isinstance(v, str) and re.fullmatch(r"[\d.]+", v)
                                                  else f"  {k}: {v}" for k, v in p.front_matter.items()]
    lines += ["", "variables:"] + ([f"  {k}={v}" for k, v in p.variables.items()] or ["  (none)"])
    lines += [""] + ([f"problem: {problem}" for problem in p.problems] or
                     [f"checked: file sizes (regular files under {MAX_REGULAR_BYTES // 10**6} MB, binaries in LFS), "
                      f"total under {MAX_SPACE_BYTES // 10**9} GB, front matter, variables"])
    return "\n".join(lines)


# --- going up -------------------------------------------------------------------------------------------------
def deploy(p: Plan, token: str | None = None, endpoint: str | None = None) -> str:
    """Creates the Space (or reuses it), uploads the plan's files in one commit, sets its variables and hardware;
    returns the Space's URL. Hub and network errors become sentences."""
    import httpx2  # huggingface_hub's HTTP client: its connection errors are not OSErrors
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if p.problems:
        raise ValueError("the Space would be refused or broken: " + "; ".join(p.problems))
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise ValueError("no Hugging Face token: set HF_TOKEN or pass --token (a write token from "
                         "https://huggingface.co/settings/tokens)")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT"), token=token)
    step = "creating the Space"
    try:
        api.create_repo(p.space, repo_type="space", space_sdk="gradio", private=p.private, exist_ok=True,
                        space_hardware=p.hardware)
        step = "uploading the files"
        api.upload_folder(repo_id=p.space, repo_type="space", folder_path=p.root,
                          allow_patterns=[f.path for f in p.files],
                          commit_message=f"Deploy ImageCraft ({len(p.files)} files)")
        step = "setting the Space's variables"
        for name, value in p.variables.items():
            api.add_space_variable(p.space, name, value)
        if p.hardware is not None:  # an existing Space keeps its hardware unless asked
            step = f"requesting {p.hardware}"
            api.request_space_hardware(p.space, p.hardware)
    except OfflineModeIsEnabled as e:
        raise ValueError(f"{step}: HF_HUB_OFFLINE is set, so nothing can reach the Hub; unset it to deploy") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = {401: "the token is invalid", 403: f"the token cannot write to {p.space} (it needs the write role)",
                402: f"{p.hardware} needs a payment method or a PRO account on the Hub"}.get(status, "")
        raise ValueError(f"{step} failed: the Hub answered {status}{': ' + hint if hint else ''} "
                         f"({str(e).splitlines()[0]})") from e
    except (OSError, httpx2.HTTPError) as e:  # no network, DNS, a refused connection, a timeout
        raise ValueError(f"{step}: cannot reach {api.endpoint} ({type(e).__name__}: {e}); check the network, or "
                         f"HF_ENDPOINT") from e
    return f"{api.endpoint}/spaces/{p.space}"


# --- CLI -------------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--space", required=True, help="USER/NAME (or ORG/NAME) of the Space to create or update")
    parser.add_argument("--private", action="store_true", help="a private Space (a public one gets an allowlist: "
                                                               "IMAGECRAFT_MODELS=default unless --models is given)")
    parser.add_argument("--hardware", default=None, choices=HARDWARE,
                        help="the Space's hardware (default: cpu-basic for a new Space, unchanged for an existing "
                             "one); zero-a10g is ZeroGPU")
    for variable in VARIABLES:
        parser.add_argument(variable.flag, default=None, type=str, dest=variable.name,
                            help=f"{variable.name}: {variable.help}")
    parser.add_argument("--token", default=None, help="a Hub write token (default: HF_TOKEN)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the files with their sizes, the front matter and the variables, check them "
                             "against the Hub's limits, and upload nothing")


def run(args, root: Path = ROOT) -> int:
    try:
        p = plan(args.space, root, args.private, args.hardware,
                 {v.name: getattr(args, v.name) for v in VARIABLES})
        if args.dry_run:
            print(describe(p))
            return 1 if p.problems else 0
        print(f"deploying {len(p.files)} files ({p.total / 1e6:.1f} MB) to {p.space} ...", file=sys.stderr)
        print(deploy(p, args.token))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
