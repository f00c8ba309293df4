"""llama.cpp's ``llama-bench`` as the third column of ``bench/speed.py``: build, convert, run, parse.

Everything comes from the PyPI sdist of ``llama-cpp-python``, which vendors llama.cpp
(``vendor/llama.cpp``: the C++ sources, ``convert_hf_to_gguf.py`` and its ``gguf-py`` package), so no
other network access is needed:

* :func:`fetch_source` downloads the sdist with pip and unpacks it under
  ``~/.cache/edgedeploy/llama.cpp-VERSION/`` (``$XDG_CACHE_HOME`` is honoured);
* :func:`build_llama_bench` builds only the ``llama-bench`` target with cmake (static, ``GGML_NATIVE``:
  the binary is tuned for this CPU, so its folder is keyed by the CPU's model name and flags);
* :func:`convert` turns a checkpoint into an F16 GGUF with the vendored converter (cached by the caller);
* :func:`run_llama_bench` runs it with ``-o json`` and :func:`parse_bench_json` reads the result.

Tokenizers: the converter must recognise the checkpoint's tokenizer. A Llama checkpoint whose
``tokenizer.json`` is SentencePiece-style BPE (byte fallback, a ``Sequence`` decoder, as Llama-2 and
TinyLlama ship) is read with ``gguf.LlamaHfVocab``, unmodified. A byte-level (GPT-2 style) BPE, what
Phi-2 ships, is identified by hashing the ids it gives for a test string against a list of known
tokenizers; a synthetic vocabulary matches none of them and the converter stops with "BPE
pre-tokenizer was not recognized". :func:`convert_main` (this file run as a script) therefore wraps
that one lookup: when the hash is unknown and ``tokenizer.json`` has a ByteLevel pre-tokenizer (which
splits text with GPT-2's regular expression), it answers ``"gpt-2"``; everything else is the
converter's own code. llama-bench never tokenizes text (it feeds random ids), so the vocabulary only
has to be well formed.

    python bench/llamacpp.py convert SRC_DIR MODEL_DIR --outfile X.gguf --outtype f16
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

#: The llama-cpp-python sdist whose vendored llama.cpp is built (NOTES section 9 used this one).
VERSION = "0.3.36"
#: cmake options: no network or TLS code, no tests, examples or server; tuned for this CPU; one static binary.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF",
)
#: What the converter's requirements file asks for; it imports it even for a checkpoint without tokenizer.model.
SENTENCEPIECE = "sentencepiece>=0.1.98,<0.3.0"
FLASH_ATTN = {-1: "auto", 0: "off", 1: "on"}


class Unavailable(Exception):
    """llama.cpp cannot be fetched, built, converted to or run; the message is the reason for the report."""


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/edgedeploy`` (default ``~/.cache/edgedeploy``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgedeploy"


def _run(cmd: list[str], what: str, log: Path, timeout: float | None = None, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> str:
    """Run ``cmd``, appending its output to ``log``; return stdout; :class:`Unavailable` naming ``what`` if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    except FileNotFoundError as e:
        raise Unavailable(f"{what}: {e.filename} not found") from None
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{what}: timed out after {timeout:.0f} s") from None
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n[exit {proc.returncode}]\n")
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        raise Unavailable(f"{what} failed (exit {proc.returncode}: {lines[-1] if lines else 'no output'}); "
                          f"log: {log}")
    return proc.stdout


def remove_stale(folder: Path, prefix: str) -> None:
    """Remove ``PREFIX<pid>`` files and folders in ``folder`` whose process is gone (left by a killed run)."""
    for stale in folder.glob(f"{prefix}*"):
        pid = stale.name[len(prefix):]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def fetch_source(version: str = VERSION, cache: Path | None = None) -> Path:
    """The vendored llama.cpp tree of the llama-cpp-python ``version`` sdist, downloaded and unpacked once."""
    root = (cache or cache_root()) / f"llama.cpp-{version}"
    src = root / "src"
    tree = src / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            # pip prepares the sdist's metadata even for a download: in an isolated environment, so that a
            # machine without scikit-build-core installed fetches it too.
            _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                  f"llama-cpp-python=={version}", "-d", tmp], "pip download of the llama-cpp-python sdist",
                 root / "fetch.log", timeout=1800)
            found = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if not found:
                raise Unavailable(f"pip download gave no llama_cpp_python-{version}.tar.gz")
            found[0].rename(sdist)
    remove_stale(root, ".src.partial-")
    partial = root / f".src.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(partial, filter="data")
        top = partial / f"llama_cpp_python-{version}"
        if not (top / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            raise Unavailable(f"{sdist.name} has no vendor/llama.cpp")
        shutil.rmtree(src, ignore_errors=True)
        top.rename(src)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return tree


def cpu_key() -> str:
    """A short hash of the CPU's model name and flags: a ``GGML_NATIVE`` build only runs where these match."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return hashlib.sha256(f"{model}|{flags}".encode()).hexdigest()[:10]


def build_llama_bench(tree: Path, jobs: int | None = None) -> Path:
    """``llama-bench`` built from ``tree`` (the vendored llama.cpp), cached beside it per CPU; its path."""
    root = tree.parents[2]
    binary = root / f"bin-{cpu_key()}" / "llama-bench"
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None:
        raise Unavailable("cmake is not installed (Debian package cmake)")
    build = root / f"build-{cpu_key()}"
    log = root / "build.log"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(tree), "-B", str(build), *gen, *CMAKE_OPTIONS], "cmake configure of llama.cpp", log)
    _run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(jobs or os.cpu_count() or 1)],
         "cmake build of llama-bench", log, timeout=3600)
    built = build / "bin" / "llama-bench"
    if not built.is_file():
        raise Unavailable(f"the build finished without {built}; log: {log}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f".llama-bench.partial-{os.getpid()}")
    shutil.copy2(built, tmp)
    tmp.rename(binary)
    return binary


def converter_env(tree: Path) -> dict[str, str]:
    """The environment for the converter: ``sentencepiece`` (which the converter imports before it looks for a
    ``tokenizer.model``, even for a checkpoint without one) installed with pip beside the sources if this
    Python lacks it; nothing is installed into the Python environment itself."""
    env = dict(os.environ)
    if importlib.util.find_spec("sentencepiece") is not None:
        return env
    deps = tree.parents[2] / "pydeps"
    if not (deps / "sentencepiece").is_dir():
        remove_stale(deps.parent, ".pydeps.partial-")
        partial = deps.with_name(f".pydeps.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:", "--target", str(partial),
              SENTENCEPIECE], "pip install of sentencepiece for the converter", tree.parents[2] / "fetch.log",
             timeout=1800)
        shutil.rmtree(deps, ignore_errors=True)
        partial.rename(deps)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(deps), env.get("PYTHONPATH")) if p)
    return env


def convert(tree: Path, model_dir: Path, out: Path, log: Path, outtype: str = "f16") -> Path:
    """Convert ``model_dir`` to a GGUF at ``out`` (written beside it, renamed when complete)."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    env = converter_env(tree)
    remove_stale(out.parent, f".{out.name}.partial-")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        _run([sys.executable, str(Path(__file__).resolve()), "convert", str(tree), str(model_dir),
              "--outfile", str(tmp), "--outtype", outtype], f"GGUF conversion of {model_dir.name}", log,
             timeout=3600, env=env)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def run_llama_bench(binary: Path, gguf: Path, threads: int, n_prompt: int, n_gen: int, depth: int,
                    flash_attn: tuple[int, ...], reps: int, log: Path, timeout: float = 3600) -> list[dict[str, Any]]:
    """One ``llama-bench`` invocation (``-o json``); its tests, parsed by :func:`parse_bench_json`."""
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-d", str(depth), "-fa", ",".join(str(f) for f in flash_attn), "-r", str(reps), "-o", "json"]
    out = _run(cmd, f"llama-bench on {gguf.name}", log, timeout=timeout)
    return parse_bench_json(out)


def parse_bench_json(text: str) -> list[dict[str, Any]]:
    """The tests in llama-bench's ``-o json`` output, each with ``phase`` ("prefill"/"decode"),
    ``tokens``, ``depth``, ``flash_attn`` ("on"/"off"/"auto"), per-repetition ``samples_tok_s`` and their median.
    """
    start = text.find("[")
    if start < 0:
        raise Unavailable("llama-bench printed no JSON")
    try:
        tests = json.loads(text[start:])
    except json.JSONDecodeError as e:
        raise Unavailable(f"llama-bench JSON does not parse ({e})") from None
    out = []
    for t in tests:
        samples = [float(s) for s in t.get("samples_ts") or [t["avg_ts"]]]
        phase = "prefill" if t["n_prompt"] > 0 else "decode"
        out.append({
            "phase": phase, "tokens": int(t["n_prompt"] or t["n_gen"]), "depth": int(t.get("n_depth", 0)),
            "flash_attn": FLASH_ATTN.get(int(t.get("flash_attn", -1)), str(t.get("flash_attn"))),
            "threads": int(t["n_threads"]), "samples_tok_s": samples, "median_tok_s": statistics.median(samples),
            "build_commit": t.get("build_commit"), "cpu_info": t.get("cpu_info"),
            "model_size": t.get("model_size"), "model_n_params": t.get("model_n_params"),
        })
    return out


def best(tests: list[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    """The test of ``phase`` with the highest median tok/s (the better of flash attention on and off)."""
    cands = [t for t in tests if t["phase"] == phase]
    return max(cands, key=lambda t: t["median_tok_s"]) if cands else None


def measure(binary: Path, gguf: Path, threads: int, prompt: int, decode: int, reps: int,
            log: Path) -> dict[str, Any]:
    """Prefill of ``prompt`` tokens from an empty context and ``decode`` steps after ``prompt`` tokens of context,
    each with flash attention off and on; the better of the two per phase, with every test kept."""
    tests = run_llama_bench(binary, gguf, threads, prompt, 0, 0, (0, 1), reps, log)
    tests += run_llama_bench(binary, gguf, threads, 0, decode, prompt, (0, 1), reps, log)
    pre, dec = best(tests, "prefill"), best(tests, "decode")
    if pre is None or dec is None:
        raise Unavailable("llama-bench gave no prefill or no decode result")
    return {"prefill_tok_s": pre["median_tok_s"], "prefill_samples": pre["samples_tok_s"],
            "prefill_flash_attn": pre["flash_attn"], "decode_tok_s": dec["median_tok_s"],
            "decode_samples": dec["samples_tok_s"], "decode_flash_attn": dec["flash_attn"],
            "build_commit": pre["build_commit"], "tests": tests}


# -- the converter wrapper (runs in its own process) ---------------------------------------------------


def _byte_level_bpe(model_dir: Path) -> bool:
    try:
        tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = tok.get("pre_tokenizer") or {}
    kinds = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", [])]
    return tok.get("model", {}).get("type") == "BPE" and "ByteLevel" in kinds


def convert_main(argv: list[str]) -> None:
    """``convert SRC_DIR CONVERTER_ARGS...``: the vendored converter, with unknown byte-level BPEs named gpt-2."""
    tree = Path(argv[0]).resolve()
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    sys.argv = [str(tree / "convert_hf_to_gguf.py"), *argv[1:]]
    import conversion.base as base  # the vendored converter's package

    lookup = base.TextModel.get_vocab_base_pre

    def vocab_pre(self: Any, tokenizer: Any) -> str:
        try:
            return lookup(self, tokenizer)
        except NotImplementedError:
            if not _byte_level_bpe(Path(self.dir_model)):
                raise
            base.logger.warning("edgedeploy bench: unknown byte-level BPE tokenizer; using the gpt-2 pre-tokenizer")
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = vocab_pre
    import convert_hf_to_gguf

    convert_hf_to_gguf.main()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "convert":
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    convert_main(sys.argv[2:])
