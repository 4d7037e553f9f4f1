"""llama.cpp's side of ``benchmarks/llamacpp.py``, run by the Python of a venv that has ``llama-cpp-python`` (and
numpy) but not lowbit, so every number it returns comes from llama.cpp's own code.

    python _llamacpp_worker.py quantize SRC.gguf DST.gguf TYPE THREADS
        llama.cpp's quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) from a full-precision GGUF.
    python _llamacpp_worker.py score OUT.json WINDOWS.npy THREADS REF.gguf [FILE.gguf ...]
        Next-token NLL of every window token by every file (logits from llama.cpp, no sampling), top-1 agreement
        with and KL from the first file (the full-precision reference), prefill and batch-1 decode speed.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama

DECODE_PROMPT, DECODE_TOKENS, REPEATS = 512, 128, 3


def quantize(src: str, dst: str, kind: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {kind}")


def _log_probs(path: str, window: np.ndarray, threads: int) -> np.ndarray:
    """log-softmax of llama.cpp's logits at every position but the last, ``[L - 1, vocab]`` (one model loaded at a
    time: a context that keeps every position's logits holds ``L x vocab`` floats)."""
    llm = Llama(model_path=path, n_ctx=len(window), n_threads=threads, n_threads_batch=threads, logits_all=True,
                verbose=False)
    llm.eval(window.tolist())
    logits = np.array(llm.scores[: len(window) - 1], dtype=np.float32)
    del llm
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits, dtype=np.float64).sum(-1, keepdims=True)).astype(np.float32)


def _speed(path: str, window: np.ndarray, threads: int) -> dict:
    """Prefill of the whole window and greedy decode of ``DECODE_TOKENS`` after ``DECODE_PROMPT`` tokens, batch 1,
    llama.cpp's default batch sizes; medians of ``REPEATS`` runs of wall time around ``eval``."""
    llm = Llama(model_path=path, n_ctx=max(len(window), DECODE_PROMPT + DECODE_TOKENS), n_threads=threads,
                n_threads_batch=threads, verbose=False)
    prefill, decode = [], []
    for _ in range(REPEATS):
        llm.reset()
        start = time.perf_counter()
        llm.eval(window.tolist())
        prefill.append(time.perf_counter() - start)
        llm.reset()
        llm.eval(window[:DECODE_PROMPT].tolist())
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
            llm.eval([int(logits.argmax())])
        decode.append(time.perf_counter() - start)
    return {"prefill_tok_s": len(window) / float(np.median(prefill)),
            "decode_tok_s": DECODE_TOKENS / float(np.median(decode)),
            "prefill_tokens": len(window), "decode_prompt": DECODE_PROMPT, "decode_tokens": DECODE_TOKENS}


def score(out: str, windows_path: str, threads: int, files: list[str]) -> None:
    windows = np.load(windows_path)
    result = {f: {"nll": [], "top1_vs_ref": [], "kl_vs_ref": []} for f in files}
    for window in windows:
        targets = window[1:]
        ref = None
        for f in files:
            logp = _log_probs(f, window, threads)
            r = result[f]
            r["nll"].append((-logp[np.arange(len(targets)), targets]).tolist())
            if ref is None:
                ref = logp
            r["top1_vs_ref"].append(float((logp.argmax(-1) == ref.argmax(-1)).mean()))
            r["kl_vs_ref"].append(float((np.exp(ref, dtype=np.float64) * (ref - logp)).sum(-1).mean()))
    for f in files:
        result[f]["speed"] = _speed(f, windows[0], threads)
    result["llama_cpp_version"] = llama_cpp.__version__
    with open(out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "quantize":
        quantize(args[0], args[1], args[2], int(args[3]))
    elif command == "score":
        score(args[0], args[1], int(args[2]), args[3:])
    else:
        raise SystemExit(f"unknown command {command}")
