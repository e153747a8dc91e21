"""A fine-tune's data: captioned images found in a folder (kohya's layout or diffusers' imagefolder) or a zip,
loaded upright and cropped to the model's size, encoded once to cached latents, and prior preservation's class
images drawn by the base model."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import lzma
import re
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..files import atomic_write
from ..settings import MAX_TRAINING_IMAGES
from .core import load_checkpoint, save_checkpoint

log = logging.getLogger("imagecraft.finetune")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused before they are decoded
SKIPPED_FOLDERS = {"checkpoints", "cache", "previews", "__MACOSX"}

@dataclass
class Example:
    path: Path
    caption: str


def find_examples(folder: str | Path) -> list[Example]:
    """The folder's images and their captions (see the module's docstring); a ValueError naming what is wrong,
    including an image without a caption."""
    return read_examples(folder, require_captions=True)


def read_examples(folder: str | Path, require_captions: bool = True) -> list[Example]:
    """As `find_examples`; with require_captions False an image without one gets the caption "" (the app's upload,
    whose captions the user may still type). Every image's header is decoded and its size checked (`check_image`)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ValueError(f"data folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"data {folder} is a file; give a folder of images with captions (or unzip it first)")
    root = folder.resolve()
    for name in ("metadata.jsonl", "metadata.csv"):
        if (folder / name).is_file():
            examples = _from_metadata(folder / name, root, require_captions)
            for ex in examples:
                check_image(ex.path, ex.path.relative_to(root).as_posix())
            return examples
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") or part in SKIPPED_FOLDERS
                                for part in p.relative_to(folder).parts[:-1]))
    if not images:
        raise ValueError(f"no images in {folder}: looked for {', '.join(IMAGE_SUFFIXES)} in it and its subfolders")
    if len(images) > MAX_TRAINING_IMAGES:
        raise ValueError(f"{folder} holds {len(images)} images; at most {MAX_TRAINING_IMAGES} are allowed")
    examples, missing = [], []
    for path in images:
        check_image(path, path.relative_to(folder).as_posix())
        text = path.with_suffix(".txt")
        caption = ""
        if text.is_file():
            try:
                caption = text.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"caption {text.relative_to(folder)} cannot be read as UTF-8 text: {e}") from e
        if not caption:
            missing.append(path)
        examples.append(Example(path, caption))
    if missing and require_captions:
        names = ", ".join(str(p.relative_to(folder)) for p in missing[:5])
        more = ", ..." if len(missing) > 5 else ""
        raise ValueError(f"{len(missing)} of {len(images)} images have no caption ({names}{more}):"
                         f" put each caption in a same-name .txt file beside its image, or list file_name and text"
                         f" in a metadata.jsonl")
    return examples


def _from_metadata(path: Path, root: Path, require_captions: bool = True) -> list[Example]:
    rows = []
    try:
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"line {n} is not a JSON object")
                    rows.append((n, row))
        else:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(enumerate(csv.DictReader(f), 2))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error, ValueError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from e
    if not rows:
        raise ValueError(f"{path} lists no images")
    if len(rows) > MAX_TRAINING_IMAGES:
        raise ValueError(f"{path} lists {len(rows)} images; at most {MAX_TRAINING_IMAGES} are allowed")
    examples = []
    for n, row in rows:
        name, text = row.get("file_name"), row.get("text")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path.name}, row {n}: no file_name (each row needs file_name and text)")
        if (not isinstance(text, str) or not text.strip()) and require_captions:
            raise ValueError(f"{path.name}, row {n}: {name} has no caption (text)")
        image = (path.parent / name).resolve()
        if not image.is_relative_to(root):
            raise ValueError(f"{path.name}, row {n}: {name!r} points outside the data folder")
        if not image.is_file():
            raise ValueError(f"{path.name}, row {n}: no image file {name!r}")
        examples.append(Example(image, text.strip() if isinstance(text, str) else ""))
    return examples


def load_image(path: Path, size: int) -> Image.Image:
    """An RGB size x size image: upright by its EXIF orientation, transparency onto white, 16-bit scaled to 8,
    shorter side resized to `size` (Lanczos), centre-cropped."""
    try:
        with Image.open(path) as image:
            w, h = image.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"image {path} is {w} x {h} px; at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels "
                                 f"are allowed")
            image.load()
            image = ImageOps.exif_transpose(image)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; one message for all
        raise ValueError(f"image {path} cannot be read ({type(e).__name__}: {e})") from e
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        pixels = pixels / 257 if pixels.max() > 255 else pixels
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.LANCZOS)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


MAX_ZIP_BYTES = 1 << 30  # 1 GiB uncompressed
MAX_ZIP_MEMBERS = 2 * MAX_TRAINING_IMAGES + 16  # entries of any kind, folders included: an image and a caption each
MAX_ZIP_RATIO = 200  # uncompressed / compressed, per member: more is a zip bomb
MAX_CAPTION_BYTES = 64 << 10  # a .txt caption (the app keeps 1000 characters of it)
MAX_METADATA_BYTES = 8 << 20  # metadata.jsonl / .csv: a caption per image for MAX_TRAINING_IMAGES images
MAX_NAME_BYTES = 255  # one part of a member's path, as most file systems allow
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")


def check_image(path: Path, name: str | None = None) -> tuple[int, int]:
    """(width, height) of an image file whose header decodes and whose pixel count is within MAX_IMAGE_PIXELS;
    otherwise a ValueError naming it (`name`, else the file's name: never the server's path)."""
    name = name or path.name
    try:
        with Image.open(path) as image:
            w, h = image.size
    except Image.DecompressionBombError:
        raise ValueError(f"image {name} has far over {MAX_IMAGE_PIXELS // 1_000_000} megapixels, the most "
                         f"allowed") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a file that is not an image
        raise ValueError(f"{name} is not an image that can be read ({type(e).__name__})") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"image {name} is {w} x {h} px; at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels are "
                         f"allowed")
    return w, h


def _zip_plan(zf: zipfile.ZipFile, label: str, max_bytes: int, max_members: int) -> list[zipfile.ZipInfo]:
    """The members worth unpacking (images and captions), every entry checked from the archive's directory before
    anything is written: a sentence naming the first one that is refused."""
    entries = zf.infolist()
    if len(entries) > max_members:
        raise ValueError(f"{label} holds {len(entries)} entries; at most {max_members} are allowed")
    names = [m.filename.replace("\\", "/").rstrip("/") for m in entries]
    folders = {"/".join(parts[:i]) for n in names for parts in [n.split("/")] for i in range(1, len(parts))}
    folders |= {n for n, m in zip(names, entries) if m.is_dir()}
    seen, plan, total = set(), [], 0
    for m, name in zip(entries, names):
        def refuse(why, entry=m):
            raise ValueError(f"{label}: the entry {entry.filename[:80]!r} {why}")

        if name.startswith("/") or ".." in name.split("/") or ":" in name:
            refuse("points outside the folder it unpacks to")
        if any(len(part.encode()) > MAX_NAME_BYTES for part in name.split("/")) or len(name) > 1024:
            refuse(f"has a name longer than file systems allow ({MAX_NAME_BYTES} bytes a part, 1024 in all)")
        if (m.external_attr >> 16) & 0o170000 == 0o120000:
            refuse("is a symbolic link; links are not unpacked")
        if m.is_dir():
            continue
        if name in seen:
            refuse("appears twice")
        seen.add(name)
        if name in folders:
            refuse("is both a file and a folder")
        suffix = Path(name).suffix.lower()
        if suffix not in IMAGE_SUFFIXES + TEXT_SUFFIXES:
            continue
        if m.flag_bits & 0x1:
            refuse("is encrypted; unpack it and zip it again without a password")
        if m.compress_type not in ZIP_METHODS:
            refuse(f"uses compression method {m.compress_type} (deflate64?), which cannot be read; zip it again "
                   f"with plain deflate")
        cap = MAX_CAPTION_BYTES if suffix == ".txt" else MAX_METADATA_BYTES if suffix in TEXT_SUFFIXES else None
        if cap is not None and m.file_size > cap:
            refuse(f"is {m.file_size / 2**10:,.0f} KiB; a caption file may hold at most {cap >> 10:,} KiB")
        if m.compress_size and m.file_size / m.compress_size > MAX_ZIP_RATIO and m.file_size > 1 << 20:
            refuse(f"expands {m.file_size // m.compress_size}x (a zip bomb?); at most {MAX_ZIP_RATIO}x is allowed")
        total += m.file_size
        plan.append(m)
    if total > max_bytes:
        raise ValueError(f"{label} unpacks to {total / 2**20:,.0f} MiB; at most {max_bytes / 2**20:,.0f} MiB are "
                         f"allowed")
    return plan


def _unpack(archive: Path, folder: Path, max_bytes: int, max_members: int) -> None:
    """Unpacks a zip's images and captions into `folder` (see `extract_zip`); may leave part of them on error."""
    label = archive.name
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ValueError(f"{label} is not a readable zip file: {e}") from None
    with zf:
        for m in _zip_plan(zf, label, max_bytes, max_members):
            target = folder / m.filename.replace("\\", "/")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as dst:
                    copied = 0
                    while chunk := src.read(1 << 20):
                        copied += len(chunk)
                        if copied > m.file_size:  # the header lied about the size
                            raise ValueError(f"{label}: the entry {m.filename[:80]!r} is larger than it says")
                        dst.write(chunk)
                if copied != m.file_size:
                    raise ValueError(f"{label}: the entry {m.filename[:80]!r} is smaller than it says")
            except ValueError:
                raise
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError,
                    lzma.LZMAError) as e:
                why = "is corrupt (its checksum does not match)" if "CRC" in str(e) else \
                    f"is corrupt (its data cannot be unpacked: {type(e).__name__})"
                raise ValueError(f"{label}: the entry {m.filename[:80]!r} {why}") from None


def extract_zip(archive: str | Path, folder: str | Path, max_bytes: int = MAX_ZIP_BYTES,
                max_members: int = MAX_ZIP_MEMBERS) -> Path:
    """Unpacks a zip of captioned images into `folder` (replacing it) and returns it: `take_upload` of one zip,
    which refuses path traversal, links, encrypted or unreadable members, corrupt data, sizes that lie, a name both a
    file and a folder, over-long names, zip bombs, big captions, images that do not decode or are too large, and
    more than `max_bytes` unpacked or `max_members` entries, leaving nothing on disk."""
    take_upload([archive], folder, max_bytes, max_members, require_captions=False)
    return Path(folder)


def upload_bytes(paths, max_bytes: int = MAX_ZIP_BYTES, max_members: int = MAX_ZIP_MEMBERS) -> int:
    """What `take_upload` would write for these files, from their sizes and their zips' directories, which are
    checked first as `take_upload` checks them (the same sentences, before anything is written). A server makes room
    for this much before it unpacks; a zip that cannot be opened counts 0 (`take_upload` refuses it)."""
    total = 0
    for p in map(Path, paths):
        if p.suffix.lower() != ".zip":
            total += p.stat().st_size if p.suffix.lower() in IMAGE_SUFFIXES + TEXT_SUFFIXES else 0
            continue
        try:
            zf = zipfile.ZipFile(p)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            continue
        with zf:
            total += sum(m.file_size for m in _zip_plan(zf, p.name, max_bytes, max_members))
    if total > max_bytes:
        raise ValueError(f"the upload unpacks to {total / 2**20:,.0f} MiB; at most {max_bytes / 2**20:,.0f} MiB are "
                         f"allowed")
    return total


def take_upload(paths, folder: str | Path, max_bytes: int = MAX_ZIP_BYTES, max_members: int = MAX_ZIP_MEMBERS,
                require_captions: bool = True) -> list[Example]:
    """Training data handed in as files, checked completely before it is accepted: the app's upload and the CLI's
    --data zip both come here. Images, their .txt captions, metadata.jsonl / metadata.csv and zips of them are
    copied or unpacked into `folder` (replacing it; one source at its root, several each in a numbered subfolder)
    and read as `read_examples` reads a folder. `max_bytes` and `max_members` cap the whole upload. A refused
    upload leaves nothing on disk; every sentence names the file or zip entry, never a server path."""
    folder, sources = Path(folder), [Path(p) for p in paths]
    if not sources:
        raise ValueError("no training data: give images with .txt captions, or a zip of them")
    staging = folder.with_name(f".{folder.name}.taking")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        loose = [p for p in sources if p.suffix.lower() != ".zip"]
        names = [p.name for p in loose]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two files are named {twice[0]!r}: captions are matched by file name, so rename one")
        if len(loose) > max_members:
            raise ValueError(f"{len(loose)} files uploaded; at most {max_members} are allowed")
        used = 0
        for p in loose:
            size = p.stat().st_size
            suffix = p.suffix.lower()
            if suffix == ".txt" and size > MAX_CAPTION_BYTES:
                raise ValueError(f"{p.name} is {size / 2**10:,.0f} KiB; a caption file may hold at most "
                                 f"{MAX_CAPTION_BYTES >> 10:,} KiB")
            if suffix in TEXT_SUFFIXES and size > MAX_METADATA_BYTES:
                raise ValueError(f"{p.name} is {size / 2**20:,.0f} MiB; at most {MAX_METADATA_BYTES >> 20} MiB "
                                 f"are allowed")
            used += size
        if used > max_bytes:
            raise ValueError(f"the upload holds {used / 2**20:,.0f} MiB; at most {max_bytes / 2**20:,.0f} MiB are "
                             f"allowed")
        several = len(sources) - len(loose) + bool(loose) > 1
        parts = []
        if loose:
            parts.append(staging / "0" if several else staging)
            parts[-1].mkdir(exist_ok=True)
            for p in loose:
                if p.suffix.lower() in IMAGE_SUFFIXES + TEXT_SUFFIXES:
                    shutil.copyfile(p, parts[-1] / p.name)
        for p in sources:
            if p.suffix.lower() == ".zip":
                parts.append(staging / str(len(parts)) if several else staging)
                parts[-1].mkdir(exist_ok=True)
                _unpack(p, parts[-1], max_bytes - used, max_members)
                used += sum(f.stat().st_size for f in parts[-1].rglob("*") if f.is_file())
        examples = []
        for part in parts:
            try:
                examples += read_examples(part, require_captions)
            except ValueError as e:  # the sentence names our staging folder: say "the upload" instead
                raise ValueError(str(e).replace(str(part.resolve()), "the upload").replace(str(part), "the upload")
                                 ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return [Example(folder / ex.path.resolve().relative_to(staging.resolve()), ex.caption) for ex in examples]


def images_digest(examples: list[Example]) -> str:
    """One hash of every image's bytes, in order (read once per run)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(hashlib.sha256(ex.path.read_bytes()).digest())
    return digest.hexdigest()


def data_key(images: str, size: int, flip: bool, model_key: str) -> str:
    """What the cached latents depend on: the images (`images_digest`), the size, flips and the VAE's weights."""
    return hashlib.sha256(f"{images}|{size}|{flip}|{model_key}".encode()).hexdigest()[:16]


def vae_key(vae) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_images(pipe, examples: list[Example], size: int, flip: bool, cache: Path,
                  digest: str | None = None) -> torch.Tensor:
    """Latents (N or 2N with flips, 4, size / f, size / f), scaled as the UNet sees them; cached under `cache`
    keyed on the images (`digest`: their `images_digest`, computed when not given), the size, flips and the VAE."""
    key = data_key(digest or images_digest(examples), size, flip, vae_key(pipe.vae))
    path = cache / f"latents-{key}.pt"
    state = load_checkpoint(path)
    if state is not None and state.get("key") == key:
        return state["latents"]
    images = [load_image(ex.path, size) for ex in examples]
    if flip:
        images += [ImageOps.mirror(im) for im in images]
    latents = []
    vae = pipe.vae
    for start in range(0, len(images), 8):
        x = torch.from_numpy(np.stack([np.asarray(im) for im in images[start:start + 8]])).permute(0, 3, 1, 2)
        x = (x.float() / 127.5 - 1).to(vae.device, vae.dtype)
        z = vae.encode(x).latent_dist.mean  # the mean: the VAE's sampling noise is tiny and only blurs the data
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents.append(((z - shift) * vae.config.scaling_factor).float().cpu())
    latents = torch.cat(latents)
    cache.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, dict(latents=latents, key=key))
    return latents


CLASS_SEED = 5000


def class_examples(pipe, recipe, folder: Path, rank: int = 0, world: int = 1, wait=lambda: None,
                   should_stop=None) -> list[Example] | None:
    """Prior preservation's images: the base model's own for recipe.class_prompts (taken in turn; image i with seed
    CLASS_SEED + i, the previews' steps and guidance), written once to `folder` as captioned PNGs (kohya's layout,
    so they can be looked at) and reused while the base model, the prompts and the settings are the same. With
    several processes each draws its share, a contiguous run of images (`wait` is their barrier). None when
    `should_stop()` turned True between batches."""
    prompts = [recipe.class_prompts[i % len(recipe.class_prompts)] for i in range(recipe.class_images)]
    key = hashlib.sha256(json.dumps([pipe.model_id, pipe.model_hash, pipe.default_size, prompts, CLASS_SEED,
                                     recipe.preview_steps, recipe.preview_guidance]).encode()).hexdigest()[:16]
    stamp = folder / "key.txt"
    if stamp.is_file() and stamp.read_text().strip() == key:
        return find_examples(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # the set of another base or other prompts; only the files this function writes
        stamp.unlink(missing_ok=True)
        for old in folder.glob("[0-9][0-9][0-9][0-9].*"):
            if old.suffix in (".png", ".txt") and old.stem.isdigit() and int(old.stem) >= len(prompts):
                old.unlink()
    wait()
    log.info("making %d prior-preservation images with the base model", len(prompts))
    first, last = len(prompts) * rank // world, len(prompts) * (rank + 1) // world  # this process's share
    for start in range(first, last, 8):
        if should_stop is not None and should_stop():
            return None
        batch = prompts[start:min(start + 8, last)]
        images = pipe(batch, seed=CLASS_SEED + start, num_inference_steps=recipe.preview_steps,
                      guidance_scale=recipe.preview_guidance).images  # image i: seed CLASS_SEED + i
        for i, image in enumerate(images, start):
            with atomic_write(folder / f"{i:04d}.png") as f:
                image.save(f, format="PNG")
            with atomic_write(folder / f"{i:04d}.txt") as f:
                f.write(prompts[i].encode())
    wait()
    if rank == 0:
        with atomic_write(stamp) as f:
            f.write(key.encode())
    wait()
    return find_examples(folder)



# --- the words a fine-tune teaches -----------------------------------------------------------------------------
# Words that carry no concept of their own: never taken for the one a data set teaches.
FUNCTION_WORDS = frozenset("a an the of on in at to with and or by for from is are this that its his her their "
                           "into onto over under near".split())
CONCEPT_SHARE = 0.8  # a word in at least this share of the captions is what the data teaches


def words_of(caption: str) -> list[str]:
    """The caption's words, lower-cased: runs of letters, digits, apostrophes and hyphens."""
    return re.findall(r"[\w'-]+", caption.lower())


def concept_words(captions: list[str]) -> list[str]:
    """The words a data set teaches, as DreamBooth's identifier ("sks") or a new colour word: the content words in
    at least CONCEPT_SHARE of the captions (at least two), in the order they first appear. Words the data
    shows only sometimes (the shapes, the positions) are the ones it must not change."""
    if len(captions) < 2:
        return []
    counts = {}
    for caption in captions:
        for word in dict.fromkeys(words_of(caption)):
            counts[word] = counts.get(word, 0) + 1
    return [w for w, n in counts.items() if n >= CONCEPT_SHARE * len(captions) and w not in FUNCTION_WORDS]


def without_words(caption: str, words) -> str:
    """The caption with every whole-word occurrence of `words` (any case) removed, spaces tidied."""
    return swapped_words(caption, words, "")


def known_words(tokenizer, exclude=()) -> list[str]:
    """Whole words the tokenizer has a token of its own for (CLIP's `word</w>`), three letters or more, other than
    the function words and `exclude`: words the base model read in training, in vocabulary order. A word that ends
    another such word is left out: BPE keeps the pieces it builds words from ("ange" of "orange"), which no caption
    holds alone; in a large vocabulary this drops a few real words too, among tens of thousands."""
    skip = FUNCTION_WORDS | {w.lower() for w in exclude}
    words = [t[:-len("</w>")] for t in sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
             if t.endswith("</w>")]
    words = [w for w in words if len(w) >= 3 and w.isalpha()]
    suffixes = {w[i:] for w in words for i in range(1, len(w) - 2)}
    return [w for w in words if w not in skip and w not in suffixes]


def swapped_words(caption: str, words, replacement: str) -> str:
    """The caption with every whole-word occurrence of `words` replaced by `replacement` (removed when empty)."""
    if not words:
        return caption
    pattern = r"(?<![\w'-])(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")(?![\w'-])"
    return " ".join(re.sub(pattern, f" {replacement} ", caption, flags=re.IGNORECASE).split())
